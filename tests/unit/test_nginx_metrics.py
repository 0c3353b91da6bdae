"""nginx's request metrics (mlflow/nginx_metrics.py): the log line nginx's
template defines, parsed and counted; the e2e monitoring test reads them back
through Prometheus from a real nginx."""

import importlib.util
import re
import socket
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry

from stack import common
from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("nginx_metrics", ROOT / "mlflow" / "nginx_metrics.py")
nm = importlib.util.module_from_spec(_spec)
sys.modules["nginx_metrics"] = nm  # dataclasses look their module up
_spec.loader.exec_module(nm)

TEMPLATE = (ROOT / "nginx/templates/mlflow.conf.template").read_text()


def syslog(message: str, day: str = "27") -> str:
    # nginx's header with nohostname: "<PRI>Mmm dd hh:mm:ss TAG: "; days below 10 are space-padded.
    return f"<190>Nov {day:>2} 01:30:00 {common.NGINX_METRICS_TAG}: {message}"


def test_the_template_logs_the_fields_the_parser_reads():
    fmt = re.search(r"log_format stack_metrics '([^']*)';", TEMPLATE)[1]
    assert fmt.split() == [nm.LOG_FORMAT_VERSION, "$stack_route", "$status", "$request_time",
                           "$upstream_response_time", "$request_length", "$bytes_sent"]
    routes = set(re.findall(r"^\s+(?:\"[^\"]*\"|default) (\w+);$",
                            TEMPLATE.split("$stack_route {", 1)[1].split("\n}", 1)[0], re.M))
    assert routes == set(nm.ROUTES)
    # Both servers that answer clients log it (the S3 server sets its own access_log).
    assert TEMPLATE.count("access_log ${NGINX_METRICS_LOG} stack_metrics;") == 2


@pytest.mark.parametrize("line, expected", [
    (syslog("v1 api 200 0.012 0.011 345 1203"), ("api", "200", 0.012, 0.011, 345, 1203)),
    (syslog("v1 artifacts 502 3.000 1.000, 2.000 1048976 157", day="7"), ("artifacts", "502", 3.0, 3.0, 1048976, 157)),
    (syslog("v1 ui 308 0.000 - 120 300"), ("ui", "308", 0.0, None, 120, 300)),
    (syslog("v1 s3 200 0.100 0.050 : 0.040 10 20"), ("s3", "200", 0.1, pytest.approx(0.09), 10, 20)),
    ("v1 http 301 0.000 - 80 200", ("http", "301", 0.0, None, 80, 200)),
])
def test_lines_are_parsed(line, expected):
    r = nm.parse(line)
    assert (r.route, r.status, r.seconds, r.upstream_seconds, r.request_bytes, r.response_bytes) == expected


@pytest.mark.parametrize("line", [
    "", "garbage", syslog("v2 api 200 0.012 0.011 345 1203"), syslog("v1 nosuch 200 0.1 - 1 1"),
    syslog("v1 api 2000 0.1 - 1 1"), syslog("v1 api 200 0.1 - 1"),
])
def test_other_lines_are_refused(line):
    assert nm.parse(line) is None


def test_requests_are_counted_by_route_and_status():
    registry = CollectorRegistry()
    metrics = nm.Metrics(registry)
    for line in [syslog("v1 api 200 0.004 0.003 100 200")] * 3 + [syslog("v1 api 503 0.200 0.199 100 50"),
                                                                  syslog("v1 artifacts 200 42.0 41.9 999 10"),
                                                                  "not a line"]:
        metrics.record(line)

    def value(name, **labels):
        return registry.get_sample_value(name, labels) or 0.0

    assert value("nginx_http_requests_total", route="api", status="200") == 3
    assert value("nginx_http_requests_total", route="api", status="503") == 1
    assert value("nginx_http_request_duration_seconds_count", route="api") == 4
    assert value("nginx_http_request_duration_seconds_bucket", route="api", le="0.005") == 3
    assert value("nginx_upstream_response_duration_seconds_bucket", route="artifacts", le="30.0") == 0
    assert value("nginx_upstream_response_duration_seconds_bucket", route="artifacts", le="60.0") == 1
    assert value("nginx_http_request_size_bytes_total", route="api") == 400
    assert value("nginx_metrics_lines_unparsed_total") == 1
    # Every route has series before its first request.
    assert registry.get_sample_value("nginx_http_request_duration_seconds_count", {"route": "prometheus"}) == 0


def test_the_target_is_the_exporter_only_with_the_monitoring_profile():
    assert common.nginx_metrics_log("") == "/dev/null"
    assert common.nginx_metrics_log("backup,gc") == "/dev/null"
    target = common.nginx_metrics_log("backup,monitoring")
    assert target == (f"syslog:server={common.NGINX_EXPORTER}:{common.NGINX_EXPORTER_SYSLOG_PORT},"
                      f"nohostname,tag={common.NGINX_METRICS_TAG}")


def test_the_exporter_counts_what_arrives_over_udp():
    """serve()'s receive loop on a real socket, as nginx sends: one datagram per line."""
    registry = CollectorRegistry()
    metrics = nm.Metrics(registry)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    done = threading.Event()

    def loop():
        for _ in range(5):
            metrics.record(receiver.recv(65536).decode())
        done.set()

    threading.Thread(target=loop, daemon=True).start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(5):
        sender.sendto(syslog("v1 api 404 0.001 0.001 10 10").encode(), receiver.getsockname())
    assert done.wait(5)
    assert registry.get_sample_value("nginx_http_requests_total", {"route": "api", "status": "404"}) == 5


@pytest.mark.parametrize("base", ["", "/mlflow"])
@pytest.mark.parametrize("port, uri, route", [
    ("8443", "{base}/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/m.bin", "artifacts"),
    ("8443", "{base}/ajax-api/2.0/mlflow-artifacts/artifacts/x", "artifacts"),
    ("8443", "{base}/api/2.0/mlflow/runs/log-metric", "api"),
    ("8443", "{base}/ajax-api/3.0/mlflow/traces", "api"),
    ("8443", "{base}/prometheus/api/v1/query?query=up", "prometheus"),
    ("8443", "{base}/static-files/js/main.js", "ui"),
    ("8443", "/elsewhere", "ui"),
    ("9000", "/mlflow/artifacts/1/x", "s3"),
    ("9000", "/api/2.0/mlflow/runs/log-metric", "s3"),
    ("8080", "/api/2.0/mlflow/runs/log-metric", "http"),
])
def test_the_route_map_names_each_request_as_nginx_would(base, port, uri, route):
    """nginx's map tries its regexes in the template's order; the first match wins."""
    block = TEMPLATE.split("$stack_route {", 1)[1].split("\n}", 1)[0]
    rendered = block.replace("${S3_PORT}", "9000").replace("${HTTPS_PORT}", "8443") \
        .replace("${MLFLOW_BASE_PATH}", base)
    rules = re.findall(r'^\s+"~([^"]*)" (\w+);$', rendered, re.M)
    default = re.search(r"^\s+default (\w+);$", rendered, re.M)[1]
    key = f"{port} {uri.format(base=base)}"
    assert next((name for regex, name in rules if re.search(regex, key)), default) == route


def test_serve_receives_syslog_and_answers_prometheus():
    """The real receive loop and HTTP endpoint, on free ports (the default registry, as in the container)."""
    import time
    import urllib.request

    def free(kind):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    udp, http = free(socket.SOCK_DGRAM), free(socket.SOCK_STREAM)
    threading.Thread(target=nm.serve, args=(udp, http), daemon=True).start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def scraped():
        for _ in range(3):
            sender.sendto(syslog("v1 ui 418 0.001 0.001 10 10").encode(), ("127.0.0.1", udp))
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=2).read().decode()
        except OSError:
            return ""

    deadline = time.monotonic() + 10
    while 'nginx_http_requests_total{route="ui",status="418"}' not in (text := scraped()):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.2)
    assert "nginx_http_requests_created" not in text  # *_created series are off


def test_the_profile_that_turns_the_log_on_is_the_exporters():
    from stack import pins

    _, profiles = pins._service_blocks(ROOT)[common.NGINX_EXPORTER]
    (profile,) = profiles
    assert common.nginx_metrics_log(profile).startswith("syslog:")
