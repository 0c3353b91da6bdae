"""Alerts that reach a person: Alertmanager's configuration from .env, and the
test notification of `./show_all.sh --test-alert`.

Prometheus (profile monitoring) evaluates monitoring/alerts.yml and hands what
fires to the alertmanager service, which sends it, and later its resolution,
to the receivers .env names (ALERT_WEBHOOK_URL, ALERT_EMAIL_TO with its mail
server). Alertmanager does not read environment variables in its file, so the
deploy writes it here; the webhook URL and the mail password stay out of it
and reach the service as secret files (`url_file`, `auth_password_file`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional

from . import common, paths, settings

# Where the service finds its secrets (docker-compose.yml's secrets of the same names).
SECRETS = Path("/run/secrets")
# Where docker-compose.yml mounts ALERT_SMTP_CA_FILE.
SMTP_CA = "/etc/alertmanager/smtp-ca.pem"
RECEIVER = "stack"
TEST_ALERT = "StackTestAlert"
PORT = common.port("alertmanager")
CONFIG_NAME = "alertmanager.yml"
# Failed requests to a receiver after which --test-alert stops waiting for it.
FAILURES_TO_GIVE_UP = 3
HEADER = ("# Written by ./stack_deploy.sh from .env (stack/alerts.py): edit the ALERT_* settings,\n"
          "# not this file. JSON is YAML too.\n")


def config(values: Mapping[str, str]) -> dict:
    receiver: dict = {"name": RECEIVER}
    if values.get("ALERT_WEBHOOK_URL"):
        receiver["webhook_configs"] = [{"url_file": str(SECRETS / "alert_webhook_url"), "send_resolved": True}]
    if values.get("ALERT_EMAIL_TO"):
        email = {"to": values["ALERT_EMAIL_TO"], "from": values["ALERT_EMAIL_FROM"],
                 "smarthost": values["ALERT_SMTP_HOST"], "require_tls": values["ALERT_SMTP_TLS"] == "true",
                 "send_resolved": True}
        if values.get("ALERT_SMTP_CA_FILE"):
            email["tls_config"] = {"ca_file": SMTP_CA}
        if values.get("ALERT_SMTP_USERNAME"):
            email["auth_username"] = values["ALERT_SMTP_USERNAME"]
            email["auth_password_file"] = str(SECRETS / "alert_smtp_password")
        receiver["email_configs"] = [email]
    return {
        "route": {
            "receiver": RECEIVER,
            "group_by": ["alertname", "service"],
            "group_wait": f"{values['ALERT_GROUP_WAIT_SECONDS']}s",
            "group_interval": f"{values['ALERT_GROUP_INTERVAL_SECONDS']}s",
            "repeat_interval": f"{values['ALERT_REPEAT_HOURS']}h",
            # Each test notification is a group of its own, sent at once: none waits
            # for an earlier one's group interval.
            "routes": [{"matchers": [f'alertname="{TEST_ALERT}"'], "group_by": ["..."], "group_wait": "0s"}],
        },
        "receivers": [receiver],
    }


def render(values: Mapping[str, str]) -> str:
    return HEADER + json.dumps(config(values), indent=2) + "\n"


def config_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    return paths.state_dir(environ) / CONFIG_NAME


def write(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> Path:
    """The service's configuration file, rewritten only when it changes (a re-deploy changes nothing)."""
    path = config_path(environ)
    text = render(values)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        # Read by the service's own user (nobody) through a bind mount; it holds no secret.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


def smtp_ca(values: Mapping[str, str]) -> Path:
    """ALERT_SMTP_CA_FILE (relative to the project's folder), or /dev/null to mount in its place."""
    chosen = values.get("ALERT_SMTP_CA_FILE")
    if not chosen:
        return Path(os.devnull)
    path = Path(chosen).expanduser()
    return (path if path.is_absolute() else paths.ROOT / path).resolve()


def describe(values: Mapping[str, str]) -> str:
    """Where alerts go, for ./show_all.sh."""
    kinds = settings.alert_receivers(values)
    if not kinds:
        return "nowhere: set ALERT_WEBHOOK_URL or ALERT_EMAIL_TO in .env (docs/monitoring.md) and deploy"
    parts = ["a webhook (ALERT_WEBHOOK_URL)" if kind == "webhook" else f"e-mail to {values['ALERT_EMAIL_TO']}"
             for kind in kinds]
    return " and ".join(parts)


# --- The test notification ---------------------------------------------------

# Alertmanager counts every request to a receiver, and the failed ones: a receiver
# it cannot reach is retried with back-off, each failure counted as it happens.
_SAMPLE = re.compile(r'^alertmanager_notification_requests(_failed)?_total\{([^}]*)\} (\S+)$', re.M)


def request_counts(metrics: str) -> dict[str, tuple[float, float]]:
    """{integration: (requests, failed requests)} from Alertmanager's /metrics (summed over its labels)."""
    counts: dict[str, list[float]] = {}
    for failed, labels, value in _SAMPLE.findall(metrics):
        match = re.search(r'integration="([^"]*)"', labels)
        if match:
            pair = counts.setdefault(match.group(1), [0.0, 0.0])
            pair[1 if failed else 0] += float(value)
    return {name: (total, failed) for name, (total, failed) in counts.items()}


class AlertTestError(Exception):
    """The test notification could not be sent or was not delivered; the message says why."""


def send_test(values: Mapping[str, str], compose_argv: list[str], environ: Mapping[str, str],
              timeout: float = 60, poll: float = 1.0) -> list[str]:
    """Send a test alert through the running alertmanager and wait until every receiver
    took it. Returns a line per receiver; raises AlertTestError when one did not."""
    kinds = settings.alert_receivers(values)
    if not settings.profile_on(values, "monitoring"):
        raise AlertTestError("the monitoring profile is off: set COMPOSE_PROFILES=monitoring (with any others) and "
                             "an ALERT_* receiver in .env, then deploy")
    if not kinds:
        raise AlertTestError("no receiver is set: alerts are delivered nowhere. Set ALERT_WEBHOOK_URL or "
                             "ALERT_EMAIL_TO (with ALERT_EMAIL_FROM and ALERT_SMTP_HOST) in .env and deploy")

    def in_service(*cmd: str) -> str:
        result = subprocess.run([*compose_argv, "exec", "-T", "alertmanager", *cmd], env=dict(environ),
                                capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise AlertTestError(f"the alertmanager service did not answer ({result.stderr.strip() or 'no output'}): "
                                 "is it running? ./show_all.sh, then deploy")
        return result.stdout

    def counts() -> dict[str, tuple[float, float]]:
        return request_counts(in_service("wget", "-qO-", f"http://127.0.0.1:{PORT}/metrics"))

    before = counts()
    ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
    in_service("amtool", f"--alertmanager.url=http://127.0.0.1:{PORT}", "alert", "add", TEST_ALERT,
               "severity=info", "service=alertmanager", f"test_id={uuid.uuid4().hex[:8]}", f"--end={ends}",
               "--annotation=summary=A test from ./show_all.sh --test-alert: alerts reach you.",
               "--annotation=action=nothing to do")
    deadline = time.monotonic() + timeout
    while True:
        now = counts()
        # {kind: (requests, failed requests)} since the test alert was sent.
        tried = {kind: tuple(n - b for n, b in zip(now.get(kind, (0, 0)), before.get(kind, (0, 0))))
                 for kind in kinds}
        # Each receiver took it, or kept failing (Alertmanager retries within seconds).
        if all(total > failed or failed >= FAILURES_TO_GIVE_UP for total, failed in tried.values()) \
                or time.monotonic() > deadline:
            break
        time.sleep(poll)
    lines, failed = [], []
    for kind in kinds:
        total, failures = tried[kind]
        name = "webhook (ALERT_WEBHOOK_URL)" if kind == "webhook" else f"e-mail to {values['ALERT_EMAIL_TO']}"
        if total > failures:
            lines.append(f"{name}: sent")
        elif total:
            failed.append(f"{name}: FAILED, {failures:.0f} failed tries (docker compose -p "
                          f"{paths.project_name(environ)} logs alertmanager says why)")
        else:
            failed.append(f"{name}: not tried within {timeout:.0f} s")
    if failed:
        raise AlertTestError("; ".join(lines + failed))
    return lines
