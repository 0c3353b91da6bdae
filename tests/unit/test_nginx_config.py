"""nginx's rendered configuration: gixy, the store-full message, rate limits on every location that
reaches the server, which calls are resent to another replica."""

import os
import re
import subprocess

import pytest

from static_checks import ROOT, tool
from stack import common


@pytest.mark.parametrize("base_path", ["", "/mlflow"])
def test_nginx_config_passes_gixy(tmp_path, base_path):
    """gixy on the rendered template inside an nginx.conf shaped like the image's.

    Skipped checks, on purpose: host_spoofing (the proxied Host must be the
    client's host:port: MLflow checks it against its allow-list, which the e2e
    suite tests, and SigV4 signs it for S3); worker_rlimit_nofile_vs_connections
    (the image's own nginx.conf, not this project's)."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (tmp_path / "mime.types").write_text("types {}\n")
    main = (ROOT / "tests/standins/nginx/nginx.conf").read_text()
    main = main.replace("/etc/nginx/mime.types", str(tmp_path / "mime.types")).replace(
        "/etc/nginx/conf.d", str(conf_d))
    (tmp_path / "nginx.conf").write_text(main)
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    for key, value in {"HTTP_PORT": "8080", "HTTPS_PORT": "8443", "S3_PORT": "9000", "MLFLOW_API_MAX_BODY_MB": "64",
                       "API_RATE_PER_LOGIN": "500", "API_RATE_PER_ADDRESS": "1000",
                       "MLFLOW_INTERNAL_URL": "http://mlflow:5000", "S3_INTERNAL_ENDPOINT": "http://minio:9000",
                       "PROMETHEUS_INTERNAL_URL": "http://prometheus:9090", "MLFLOW_BASE_PATH": base_path,
                       # With and without the monitoring profile.
                       "NGINX_METRICS_LOG": common.nginx_metrics_log("monitoring" if base_path else ""),
                       "STORE_FULL_MESSAGE": common.STORE_FULL_MESSAGE, "NGINX_DNS_SECONDS": "10"}.items():
        template = template.replace("${" + key + "}", value)
    assert not re.findall(r"\$\{[A-Z_]+\}", template), "a template variable this test does not render"
    (conf_d / "mlflow.conf").write_text(template)
    result = subprocess.run([tool("gixy"), "--skips", "host_spoofing,worker_rlimit_nofile_vs_connections",
                             str(tmp_path / "nginx.conf")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_store_full_message_fits_nginx_and_s3_xml():
    """nginx returns it inside '...' and an S3 <Error>: a quote, a $, a backslash or
    an XML special character would break its config or the clients' parsing."""
    import xml.etree.ElementTree as ET

    message = common.STORE_FULL_MESSAGE
    assert not set(message) & set("'\"$\\<>&"), message
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    body = re.search(r"return 507 '(.*)';", template).group(1).replace("\\n", "\n")
    error = ET.fromstring(body.replace("${STORE_FULL_MESSAGE}", message).split("\n", 1)[1])
    assert (error.findtext("Code"), error.findtext("Message")) == (common.STORE_FULL_CODE, message)
    assert "./stack_gc.sh" in message


def test_every_location_that_proxies_to_the_server_is_rate_limited():
    """nginx's internal checks (admin, login) are the only exceptions; the ones that take
    a body check the login before nginx reads it (auth_request), except the artifact
    transfers, which are not buffered (the server checks the login before it reads)."""
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    mlflow_server = template.split("listen ${HTTPS_PORT} ssl;", 1)[1].split("\n}\n", 1)[0]
    blocks = re.findall(r"\n    location (.*?) \{\n(.*?)\n    \}", mlflow_server, re.S)
    proxied = {where.strip(): body for where, body in blocks if "proxy_pass $mlflow_upstream" in body}
    assert len(proxied) >= 3, list(proxied)
    for where, body in proxied.items():
        if "/_stack/" in where:
            assert "internal;" in body, where
            continue
        assert "limit_req zone=api_login" in body and "limit_req zone=api_address" in body, where
        if "mlflow-artifacts" in where:
            assert "proxy_request_buffering off;" in body and "auth_request" not in body, where
        else:
            assert "auth_request /_stack/login-check;" in body and "error_page 403 = @login_held;" in body, where


@pytest.mark.parametrize("base", ["", "/mlflow"])
def test_only_posts_that_are_safe_twice_are_resent_to_another_replica(base):
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    regexes = re.findall(r"location ~ (\S+) \{\n(?:[^\n]*\n){5}\s+proxy_next_upstream error timeout non_idempotent;",
                         template)
    assert len(regexes) == 2, regexes  # the writes (short read timeout) and the searches
    regex = "|".join(f"(?:{r})" for r in regexes).replace("${MLFLOW_BASE_PATH}", base).replace("\\\\", "\\")
    for path in ("runs/log-metric", "runs/log-batch", "runs/log-parameter", "runs/set-tag", "runs/search",
                 "experiments/search", "logged-models/search"):
        for api in ("api", "ajax-api"):
            assert re.search(regex, f"{base}/{api}/2.0/mlflow/{path}"), path
    for path in ("runs/create", "experiments/create", "registered-models/create", "model-versions/create",
                 "users/create", "runs/log-metrics", "runs/log-metric/", "runs/delete-tag", "logged-models"):
        assert not re.search(regex, f"{base}/api/2.0/mlflow/{path}"), path


def test_the_login_holds_answer_repeats_the_servers_security_headers():
    template = (ROOT / "nginx/templates/mlflow.conf.template").read_text()
    server = template.split("listen ${HTTPS_PORT} ssl;", 1)[1]
    server_headers = re.findall(r"\n    add_header (.*);", server.split("\n    location", 1)[0])
    held = server.split("location @login_held {", 1)[1].split("\n    }", 1)[0]
    assert len(server_headers) == 5 and set(server_headers) <= set(re.findall(r"add_header (.*);", held)), held


def test_the_token_hook_writes_nginxs_variable_and_refuses_a_token_it_cannot_quote(tmp_path):
    hook = ROOT / "nginx" / "15-stack-token.sh"
    assert os.access(hook, os.X_OK), "the nginx image runs only executable hooks"
    secret, out = tmp_path / "token", tmp_path / "stack-token.conf"
    env = {"PATH": os.environ["PATH"], "STACK_NGINX_TOKEN_FILE": str(secret), "STACK_NGINX_TOKEN_CONF": str(out)}
    secret.write_text("Abc_123-xyz\n")
    for _ in range(2):  # a restart writes it again, the same
        done = subprocess.run(["sh", str(hook)], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert 'map "" $stack_nginx_token {\n    default "Abc_123-xyz";\n}' in out.read_text()
        assert out.stat().st_mode & 0o077 == 0, "the token file is root's alone"
    for bad in ('with"quote', "with space", ""):
        secret.write_text(bad)
        done = subprocess.run(["sh", str(hook)], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 1 and "STACK_NGINX_TOKEN" in done.stderr, bad
    secret.unlink()
    done = subprocess.run(["sh", str(hook)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "stack_deploy.sh" in done.stderr
