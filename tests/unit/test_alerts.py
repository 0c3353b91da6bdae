"""stack/alerts.py: Alertmanager's configuration from .env, its rules across keys,
and how the test notification reads Alertmanager's counts."""

from __future__ import annotations

import json
import stat

import pytest

from stack import alerts, settings


def values(**extra: str) -> dict[str, str]:
    base = {s.key: settings.new_secret() if s.generated else s.default for s in settings.SETTINGS}
    base.update({"COMPOSE_PROFILES": "monitoring", **extra})
    return base


MAIL = dict(ALERT_EMAIL_TO="ops@example.org, oncall@example.org", ALERT_EMAIL_FROM="mlflow@example.org",
            ALERT_SMTP_HOST="smtp.example.org:587")


def parsed(text: str) -> dict:
    assert text.startswith("# Written by ./stack_deploy.sh")
    return json.loads(text[text.index("{"):])


def test_no_receiver_is_a_receiver_with_nothing_to_send_to():
    config = parsed(alerts.render(values()))
    assert config["receivers"] == [{"name": "stack"}]
    assert config["route"]["receiver"] == "stack"
    assert alerts.describe(values()).startswith("nowhere: set ALERT_WEBHOOK_URL or ALERT_EMAIL_TO")


def test_receivers_name_files_never_the_secrets():
    url, password = "https://hooks.example.org/T0KEN", "mail-password-1234"
    text = alerts.render(values(ALERT_WEBHOOK_URL=url, ALERT_SMTP_USERNAME="alerts", ALERT_SMTP_PASSWORD=password,
                                **MAIL))
    assert url not in text and password not in text
    receiver = parsed(text)["receivers"][0]
    assert receiver["webhook_configs"] == [{"url_file": "/run/secrets/alert_webhook_url", "send_resolved": True}]
    assert receiver["email_configs"] == [{
        "to": MAIL["ALERT_EMAIL_TO"], "from": "mlflow@example.org", "smarthost": "smtp.example.org:587",
        "require_tls": True, "send_resolved": True, "auth_username": "alerts",
        "auth_password_file": "/run/secrets/alert_smtp_password"}]
    # The files the configuration names are the ones the settings table writes.
    assert {"alert_webhook_url", "alert_smtp_password"} <= set(settings.BY_KEY[k].file for k in
                                                               ("ALERT_WEBHOOK_URL", "ALERT_SMTP_PASSWORD"))


def test_a_mail_server_with_a_ca_of_its_own(tmp_path):
    receiver = parsed(alerts.render(values(ALERT_SMTP_CA_FILE="certs/smtp-ca.pem", **MAIL)))["receivers"][0]
    assert receiver["email_configs"][0]["tls_config"] == {"ca_file": "/etc/alertmanager/smtp-ca.pem"}
    assert alerts.smtp_ca(values(ALERT_SMTP_CA_FILE="certs/smtp-ca.pem")) == alerts.paths.ROOT / "certs/smtp-ca.pem"
    assert str(alerts.smtp_ca(values())) == "/dev/null"
    from stack import preflight

    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello")
    checks = preflight.check_smtp_ca(values(ALERT_SMTP_CA_FILE=str(bad)))
    assert [c.ok for c in checks] == [False] and "not a PEM certificate" in checks[0].detail
    assert preflight.check_smtp_ca(values()) == []


def test_mail_without_a_login_and_without_tls():
    receiver = parsed(alerts.render(values(ALERT_SMTP_TLS="false", **MAIL)))["receivers"][0]
    assert "webhook_configs" not in receiver
    assert receiver["email_configs"][0]["require_tls"] is False
    assert "auth_username" not in receiver["email_configs"][0]


def test_timing_comes_from_the_settings_and_a_test_alert_waits_for_nothing():
    route = parsed(alerts.render(values(ALERT_GROUP_WAIT_SECONDS="7", ALERT_GROUP_INTERVAL_SECONDS="60",
                                        ALERT_REPEAT_HOURS="12")))["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("7s", "60s", "12h")
    assert route["routes"] == [{"matchers": ['alertname="StackTestAlert"'], "group_by": ["..."], "group_wait": "0s"}]


def test_written_once_and_readable_by_the_service(tmp_path):
    environ = {"STACK_ENV_FILE": str(tmp_path / ".env"), "COMPOSE_PROJECT_NAME": "t"}
    path = alerts.write(values(), environ)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    first = path.stat().st_mtime_ns
    assert alerts.write(values(), environ) == path and path.stat().st_mtime_ns == first
    alerts.write(values(ALERT_REPEAT_HOURS="8"), environ)
    assert '"8h"' in path.read_text()


@pytest.mark.parametrize("extra, expected", [
    (dict(ALERT_EMAIL_TO="ops@example.org"), "ALERT_EMAIL_FROM and ALERT_SMTP_HOST are not"),
    (dict(MAIL, ALERT_SMTP_USERNAME="alerts"), "ALERT_SMTP_USERNAME and ALERT_SMTP_PASSWORD go together"),
    (dict(ALERT_WEBHOOK_URL="https://hooks.example.org/x", COMPOSE_PROFILES="backup"), "has no monitoring"),
    (dict(MAIL, ALERT_SMTP_USERNAME="a", ALERT_SMTP_PASSWORD="b", ALERT_SMTP_TLS="false"), "never sent in clear"),
])
def test_receivers_that_cannot_work_are_refused(extra, expected):
    problems = settings.validate(values(**extra))
    assert any(expected in p for p in problems), problems


def test_receivers_that_can_work_pass():
    assert settings.validate(values(ALERT_WEBHOOK_URL="https://hooks.example.org/x", **MAIL)) == []


def test_a_rejected_webhook_url_is_not_echoed():
    problems = settings.validate(values(ALERT_WEBHOOK_URL="ftp://secret-token-here"))
    assert problems == ["ALERT_WEBHOOK_URL is not valid: use an http(s) URL, such as "
                        "https://chat.example.com/hooks/abc"]
    assert settings.BY_KEY["ALERT_SMTP_PASSWORD"].sensitive and settings.BY_KEY["ALERT_WEBHOOK_URL"].sensitive


def test_request_counts_are_summed_per_integration():
    metrics = "\n".join([
        "# HELP alertmanager_notification_requests_total ...",
        'alertmanager_notification_requests_total{integration="webhook"} 4',
        'alertmanager_notification_requests_failed_total{integration="webhook"} 3',
        'alertmanager_notification_requests_total{integration="email"} 1',
        'alertmanager_notification_requests_failed_total{integration="email"} 0',
        'alertmanager_notifications_total{integration="email"} 9',
    ])
    assert alerts.request_counts(metrics) == {"webhook": (4.0, 3.0), "email": (1.0, 0.0)}


def test_a_test_alert_needs_monitoring_and_a_receiver():
    with pytest.raises(alerts.AlertTestError, match="monitoring profile is off"):
        alerts.send_test(values(COMPOSE_PROFILES=""), ["false"], {})
    with pytest.raises(alerts.AlertTestError, match="no receiver is set"):
        alerts.send_test(values(), ["false"], {})
