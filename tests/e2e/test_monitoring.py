"""The monitoring profile on the deployment under MLFLOW_BASE_PATH (`prefixed_stack`):
Prometheus reached through nginx at BASE/prometheus/ as an MLflow admin, every
target up, the server's and nginx's request counters rising with traffic (nginx's
by route and status code, with latency), the config and
rules accepted by promtool, and the ServiceDown alert firing for a stopped
service and clearing when it is back (also in ./show_all.sh), delivered with its
resolution by Alertmanager to a webhook and by e-mail (a real SMTP server, a
login over STARTTLS, its certificate from a CA of its own), and
`./show_all.sh --test-alert` saying which receiver took a test."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from .conftest import wait_for
from .receivers import Mailbox, Webhook, host_address

JOBS = {"prometheus", "mlflow", "nginx", "postgres", "minio", "node", "pitr", "alertmanager"}
SERVICES = ("prometheus", "postgres-exporter", "node-exporter", "nginx-exporter", "alertmanager")


@pytest.fixture(scope="module")
def receivers(tmp_path_factory):
    webhook, mailbox = Webhook(), Mailbox(tmp_path_factory.mktemp("smtp"), host_address())
    yield webhook, mailbox
    webhook.close()
    mailbox.close()


@pytest.fixture(scope="module")
def monitored(prefixed_stack, receivers):
    s = prefixed_stack
    webhook, mailbox = receivers
    host = host_address()
    on = {"COMPOSE_PROFILES": "monitoring", "ALERT_WEBHOOK_URL": webhook.url(host),
          "ALERT_EMAIL_TO": "ops@example.org, oncall@example.org", "ALERT_EMAIL_FROM": "mlflow@example.org",
          "ALERT_SMTP_HOST": f"{host}:{mailbox.port}", "ALERT_SMTP_CA_FILE": str(mailbox.ca_file),
          "ALERT_SMTP_USERNAME": mailbox.username, "ALERT_SMTP_PASSWORD": mailbox.password,
          # Sent within seconds, so that the test waits for the alert rule only.
          "ALERT_GROUP_WAIT_SECONDS": "1", "ALERT_GROUP_INTERVAL_SECONDS": "5"}
    s.environ.update(on)
    try:
        s.deploy()  # waits until the services are healthy
        yield s
    finally:
        s.compose("rm", "--stop", "--force", *SERVICES, check=False)
        for key in on:
            del s.environ[key]


def api(s, path: str, **params) -> dict:
    response = s.http("GET", f"/prometheus/api/v1/{path}", params=params)
    assert response.status_code == 200, (response.status_code, response.text[:300])
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def scalar(s, query: str) -> float:
    result = api(s, "query", query=query)["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_every_target_is_up(monitored):
    def all_up():
        targets = api(monitored, "targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return health if set(health) == JOBS and set(health.values()) == {"up"} else None

    wait_for(all_up, 120, "every Prometheus target to be up", interval=3,
             detail=lambda: {t["labels"]["job"]: (t["health"], t.get("lastError"))
                             for t in api(monitored, "targets")["activeTargets"]})


def test_prometheus_is_for_mlflow_admins_only(monitored):
    assert monitored.http("GET", "/prometheus/-/ready", auth=False).status_code == 401
    # Only nginx's internal check may ask the server who is an admin.
    assert monitored.http("GET", "/_stack/admin").status_code == 404
    name, password = f"viewer-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    created = monitored.http("POST", "/api/2.0/mlflow/users/create", json={"username": name, "password": password})
    assert created.status_code == 200, created.text
    assert monitored.http("GET", "/prometheus/-/ready", auth=(name, password)).status_code == 403
    assert monitored.http("GET", "/prometheus/-/ready").status_code == 200


def test_config_and_rules_pass_promtool(monitored):
    out = monitored.compose("exec", "-T", "prometheus", "promtool", "check", "config",
                            "/etc/prometheus/prometheus.yml").stdout
    assert "SUCCESS" in out and "rules found" in out, out


def exporter_count(s, route: str, status: str | None = None, family: str = "nginx_http_requests_total") -> float:
    """Straight from nginx-exporter (no scrape delay): the sum of a family's samples for a route."""
    code = ("import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:9113/metrics', timeout=5).read().decode())")
    text = s.compose("exec", "-T", "nginx-exporter", "python3", "-c", code).stdout
    total = 0.0
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == family and f'route="{route}"' in rest and (status is None or f'status="{status}"' in rest):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_server_and_nginx_request_counters_rise_with_traffic(monitored):
    query = "sum(mlflow_http_request_total)"
    before = wait_for(lambda: scalar(monitored, query), 180, "a first scrape of the server's counters", interval=3)
    # Baselines from the exporter itself: a Prometheus value may be a scrape old.
    counts = {"200": exporter_count(monitored, "api", "200"), "404": exporter_count(monitored, "api", "404"),
              "latency": exporter_count(monitored, "api", family="nginx_http_request_duration_seconds_count"),
              "upstream": exporter_count(monitored, "api", family="nginx_upstream_response_duration_seconds_count"),
              "s3": exporter_count(monitored, "s3")}
    for _ in range(20):
        assert monitored.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200
    for _ in range(7):
        assert monitored.http("GET", "/api/2.0/mlflow/runs/get?run_id=no-such-run").status_code == 404
    s3 = f"https://localhost:{monitored.values()['S3_PORT']}"
    for _ in range(3):  # anonymous: the store refuses, nginx counts it
        assert monitored.http("GET", "/", auth=False, base=s3).status_code == 403
    wait_for(lambda: scalar(monitored, query) >= before + 27, 180, "the counters to rise by the 27 requests",
             interval=3)
    wanted = {
        'sum(nginx_http_requests_total{route="api", status="200"})': counts["200"] + 20,
        'sum(nginx_http_requests_total{route="api", status="404"})': counts["404"] + 7,
        # The S3 port's server block logs to the exporter too.
        'sum(nginx_http_requests_total{route="s3"})': counts["s3"] + 3,
        # Latency as nginx saw it, and the server's share of it.
        'sum(nginx_http_request_duration_seconds_count{route="api"})': counts["latency"] + 27,
        'sum(nginx_upstream_response_duration_seconds_count{route="api"})': counts["upstream"] + 27,
    }
    wait_for(lambda: all(scalar(monitored, q) >= v for q, v in wanted.items()), 180,
             "nginx's counts to rise by the 20 200s and 7 404s, with their latency", interval=3,
             detail=lambda: {q: (scalar(monitored, q), v) for q, v in wanted.items()})
    assert scalar(monitored, 'sum(pg_up)') == 1
    assert scalar(monitored, 'count(node_filesystem_avail_bytes{mountpoint=~"/volumes/.*"})') >= 2
    assert scalar(monitored, "minio_cluster_capacity_usable_total_bytes") > 0


def test_a_stopped_service_fires_its_alert_and_recovering_clears_it(monitored, receivers):
    def minio_down(states=("firing",)):
        return [a for a in api(monitored, "alerts")["alerts"]
                if a["labels"]["alertname"] == "ServiceDown" and a["labels"]["job"] == "minio"
                and a["state"] in states]

    webhook, mailbox = receivers
    monitored.compose("stop", "minio")
    try:
        wait_for(minio_down, 180, "ServiceDown for minio to fire (up == 0 for 1m)", interval=5)
        shown = monitored.script("show_all.sh").stdout
        assert "firing   ServiceDown (instance=minio:9000, job=minio, service=minio)" in shown, shown
        # Delivered: to the webhook, and by e-mail to both addresses after a login.
        wait_for(lambda: webhook.alerts("firing", "ServiceDown", job="minio"), 180, "the webhook to get the alert")
        wait_for(lambda: [m for m in mailbox.messages if "[FIRING" in m["Subject"] and "ServiceDown" in m["Subject"]
                          and "minio" in m["Subject"]], 180, "an e-mail of the alert", detail=mailbox.subjects)
    finally:
        monitored.compose("start", "minio")
    wait_for(lambda: not minio_down(("firing", "pending")), 120, "the alert to clear", interval=5)
    # And its resolution.
    wait_for(lambda: webhook.alerts("resolved", "ServiceDown", job="minio"), 180, "the webhook to get the resolution")
    mail = wait_for(lambda: [m for m in mailbox.messages if "[RESOLVED]" in m["Subject"] and "ServiceDown" in
                             m["Subject"]], 180, "an e-mail of the resolution", detail=mailbox.subjects)
    assert {a.strip() for a in str(mail[0]["To"]).split(",")} == {"ops@example.org", "oncall@example.org"}
    assert "ok" in " ".join(mailbox.logins), mailbox.logins


def test_a_test_alert_says_which_receiver_took_it(monitored, receivers):
    webhook, mailbox = receivers
    shown = monitored.script("show_all.sh").stdout
    assert "alerts go to   a webhook (ALERT_WEBHOOK_URL) and e-mail to ops@example.org, oncall@example.org" in shown
    before = len(webhook.messages), len(mailbox.messages)
    done = monitored.script("show_all.sh", "--test-alert")
    assert done.stdout.splitlines() == ["webhook (ALERT_WEBHOOK_URL): sent",
                                        "e-mail to ops@example.org, oncall@example.org: sent"], done.stdout
    assert [a for m in webhook.messages[before[0]:] for a in m["alerts"]
            if a["labels"]["alertname"] == "StackTestAlert" and a["status"] == "firing"]
    assert any("StackTestAlert" in m["Subject"] for m in mailbox.messages[before[1]:]), mailbox.subjects()

    # A receiver that refuses: said, with where to look, and exit 1.
    webhook.failing.set()
    try:
        refused = monitored.script("show_all.sh", "--test-alert", check=False)
    finally:
        webhook.failing.clear()
    assert refused.returncode == 1, refused
    assert "webhook (ALERT_WEBHOOK_URL): FAILED" in refused.stderr and "logs alertmanager" in refused.stderr, \
        refused.stderr
    assert "e-mail to ops@example.org, oncall@example.org: sent" in refused.stderr, refused.stderr
    assert webhook.refused >= 3


def test_receiver_secrets_stay_out_of_docker_inspect(monitored, receivers):
    webhook, mailbox = receivers
    ids = monitored.container_ids()
    shown = subprocess.run(["docker", "inspect", ids["alertmanager"]], capture_output=True, text=True,
                           check=True).stdout
    assert webhook.token not in shown and mailbox.password not in shown
    # The service reads them from files, and its configuration names only the files.
    config = monitored.compose("exec", "-T", "alertmanager", "cat", "/etc/alertmanager/alertmanager.yml").stdout
    assert webhook.token not in config and mailbox.password not in config
    assert "/run/secrets/alert_webhook_url" in config and "/run/secrets/alert_smtp_password" in config
    checked = monitored.compose("exec", "-T", "alertmanager", "amtool", "check-config",
                                "/etc/alertmanager/alertmanager.yml").stdout
    assert "SUCCESS" in checked, checked


def test_every_metric_the_alerts_use_has_data(monitored):
    """An alert on a metric nobody exports can never fire."""
    import re

    from stack.paths import ROOT

    text = (ROOT / "monitoring/alerts.yml").read_text()
    names = set(re.findall(r"\b((?:mlflow|nginx|pg|node|minio|alertmanager)_[a-z_]+)\b", text))
    # The backup metric exists only with scheduled backups (test_backup.py's stack).
    names -= {"mlflow_stack_backup_last_good_timestamp_seconds", "mlflow_stack_backup_interval_seconds"}
    # The artifacts' copy exists only with the archive off the machine (test_pitr_offsite.py's stacks).
    names -= {"mlflow_stack_pitr_artifacts_last_copy_timestamp_seconds", "mlflow_stack_pitr_artifact_copy_interval_seconds",
              "mlflow_stack_pitr_artifact_copy_failing"}
    # WAL given up exists only once some was (tests/unit/test_pitr.py).
    names -= {"mlflow_stack_pitr_wal_last_given_up_timestamp_seconds"}
    assert {"nginx_http_requests_total", "pg_up", "node_filesystem_avail_bytes"} <= names

    def missing():
        return [n for n in sorted(names) if not scalar(monitored, f"count({n})")]

    # A service that was just restarted (the test above) is back within a scrape or two.
    wait_for(lambda: not missing(), 180, "data for every metric the alerts use", interval=5, detail=missing)
