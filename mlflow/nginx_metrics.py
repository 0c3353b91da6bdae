"""nginx's request metrics for Prometheus, from its access log (profile monitoring).

nginx's own `stub_status` counts connections only: no status codes, no
latency. So nginx sends one short line per request over syslog (UDP, the
`stack_metrics` log format in nginx/templates/mlflow.conf.template) to this
process, which counts them and serves the counts on an internal port:

  nginx_http_requests_total{route, status}
  nginx_http_request_duration_seconds{route}        histogram, client's view
  nginx_upstream_response_duration_seconds{route}   histogram, the backend's share
  nginx_http_request_size_bytes_total{route}, nginx_http_response_size_bytes_total{route}
  nginx_metrics_lines_unparsed_total                lines in an unknown format

A route is one of ROUTES: which part of the stack answered. UDP never blocks
nginx; a line lost while this process restarts is a request not counted.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Optional

from stack.common import NGINX_METRICS_TAG

# nginx's map $stack_route (mlflow.conf.template) gives one of these.
ROUTES = ("api", "artifacts", "ui", "prometheus", "s3", "http")
LOG_FORMAT_VERSION = "v1"

# Seconds; from API calls (milliseconds) to multi-GiB artifact transfers.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)

# "<190>Nov 27 01:30:00 nginx_metrics: v1 api 200 0.012 0.011 345 1203"
_LINE = re.compile(
    r"^(?:<\d{1,3}>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (?:\S+ )?" + NGINX_METRICS_TAG + r": )?"
    + LOG_FORMAT_VERSION + r" (?P<route>[a-z0-9]+) (?P<status>\d{3}) (?P<request_time>\d+\.\d+)"
    r" (?P<upstream>\S.*?) (?P<request_length>\d+) (?P<bytes_sent>\d+)$"
)


@dataclass(frozen=True)
class Request:
    route: str
    status: str
    seconds: float
    upstream_seconds: Optional[float]  # None: nginx answered itself
    request_bytes: int
    response_bytes: int


def upstream_seconds(field: str) -> Optional[float]:
    """$upstream_response_time: "-" (no upstream), "0.010", "0.010, 0.020" (the
    next server tried) or "0.010 : 0.020" (an internal redirect): their sum."""
    times = [t for t in re.split(r"[ ,:]+", field.strip()) if t and t != "-"]
    if not times:
        return None
    try:
        return sum(float(t) for t in times)
    except ValueError:
        return None


def parse(line: str) -> Optional[Request]:
    match = _LINE.match(line.strip())
    if not match or match["route"] not in ROUTES:
        return None
    return Request(
        route=match["route"],
        status=match["status"],
        seconds=float(match["request_time"]),
        upstream_seconds=upstream_seconds(match["upstream"]),
        request_bytes=int(match["request_length"]),
        response_bytes=int(match["bytes_sent"]),
    )


class Metrics:
    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.requests = Counter("nginx_http_requests", "Requests nginx answered, by route and status code.",
                                ["route", "status"], registry=registry)
        self.duration = Histogram("nginx_http_request_duration_seconds",
                                  "Time from the request's first byte to the response's last, as nginx saw it.",
                                  ["route"], buckets=BUCKETS, registry=registry)
        self.upstream = Histogram("nginx_upstream_response_duration_seconds",
                                  "Time the backend (MLflow, the object store, Prometheus) took to respond.",
                                  ["route"], buckets=BUCKETS, registry=registry)
        self.request_bytes = Counter("nginx_http_request_size_bytes", "Bytes received, headers included.",
                                     ["route"], registry=registry)
        self.response_bytes = Counter("nginx_http_response_size_bytes", "Bytes sent, headers included.",
                                      ["route"], registry=registry)
        self.unparsed = Counter("nginx_metrics_lines_unparsed", "Log lines in a format this exporter does not know.",
                                registry=registry)
        # Every route's series exist from the start, so rates and ratios have data at zero traffic.
        for route in ROUTES:
            self.duration.labels(route)
            self.upstream.labels(route)
            self.request_bytes.labels(route)
            self.response_bytes.labels(route)

    def record(self, line: str) -> None:
        request = parse(line)
        if request is None:
            self.unparsed.inc()
            return
        self.requests.labels(request.route, request.status).inc()
        self.duration.labels(request.route).observe(request.seconds)
        if request.upstream_seconds is not None:
            self.upstream.labels(request.route).observe(request.upstream_seconds)
        self.request_bytes.labels(request.route).inc(request.request_bytes)
        self.response_bytes.labels(request.route).inc(request.response_bytes)


def serve(syslog_port: int, http_port: int) -> None:
    from prometheus_client import disable_created_metrics, start_http_server

    disable_created_metrics()  # *_created series: noise for counters that start with the process
    metrics = Metrics()
    start_http_server(http_port)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A deeper queue for bursts (the kernel caps it at net.core.rmem_max).
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    receiver.bind(("0.0.0.0", syslog_port))
    print(f"nginx-metrics: syslog on udp/{syslog_port}, Prometheus metrics on :{http_port}/metrics", flush=True)
    while True:
        data = receiver.recv(65536)
        metrics.record(data.decode("utf-8", "replace"))
