"""Preflight port checks and the client settings."""

import socket

import pytest

from stack import client_env, preflight


def test_port_in_use_fails_with_a_way_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(preflight, "stack_published_ports", lambda: set())
        checks = preflight.check_ports({"BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": str(port), "S3_PORT": "1"})
    http = checks[0]
    assert not http.ok
    assert "in use" in http.detail and "HTTP_PORT" in http.detail and "ss -ltnp" in http.detail


def test_ports_of_our_own_running_stack_are_fine(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(preflight, "stack_published_ports", lambda: {port})
        checks = preflight.check_ports({"BIND_ADDRESS": "127.0.0.1", "HTTP_PORT": str(port), "S3_PORT": "1"})
    assert checks[0].ok and "this stack" in checks[0].detail


def test_foreign_bind_address_is_reported():
    ok, why = preflight.port_free("192.0.2.77", 18080)
    assert not ok and "not an address of this machine" in why


@pytest.mark.parametrize("text, expected", [
    ("20.10.24+dfsg1", (20, 10, 24)),
    ("v2.24.1", (2, 24, 1)),
    ("5.6.1", (5, 6, 1)),
    ("28.2.2-rc1", (28, 2, 2)),
])
def test_version_tuple(text, expected):
    assert preflight.version_tuple(text) == expected


def test_low_disk_is_a_clear_failure(monkeypatch):
    monkeypatch.setattr(preflight, "free_gib", lambda path: 0.5)
    monkeypatch.setattr(preflight, "_run", lambda cmd: type("R", (), {"stdout": "", "returncode": 0})())
    checks = preflight.check_disk()
    assert checks and not checks[0].ok and "free at least" in checks[0].detail


def _values(mode, auth="true"):
    return {"MLFLOW_PUBLIC_HOST": "mlflow.example.com", "HTTPS_PORT": "8443", "S3_PORT": "9000", "S3_REGION": "us-east-1",
            "MLFLOW_ARTIFACTS_MODE": mode, "MINIO_ROOT_USER": "admin", "MLFLOW_BASE_PATH": "",
            "MINIO_ROOT_PASSWORD": "it's secret", "MLFLOW_AUTH": auth,
            "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": "pw-123456789012"}


TLS = {"ca": "/s/certs/ca.crt", "bundle": "/s/certs/ca-bundle.pem"}


def test_proxied_clients_get_uri_login_and_ca():
    env = dict(client_env.client_env(_values("proxied"), TLS))
    assert env == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com:8443",
                   "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "pw-123456789012",
                   "MLFLOW_TRACKING_SERVER_CERT_PATH": "/s/certs/ca.crt",
                   "REQUESTS_CA_BUNDLE": "/s/certs/ca-bundle.pem",
                   **PART_SIZES}


# Proxied mode, the stack's own store: downloads through the server's route
# (nginx streams them), uploads of 25 MiB and more in presigned parts.
PART_SIZES = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
              "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(25 << 20),
              "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(25 << 20)}


def test_proxied_clients_of_an_outside_store_download_presigned_parts_of_8_mib():
    env = dict(client_env.client_env({**_values("proxied"), "S3_ENDPOINT_URL": "https://s3.example.com"}))
    assert env["MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE"] == str(8 << 20)
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" not in env


def test_without_auth_or_local_ca_only_the_uri_and_the_part_sizes():
    assert client_env.client_env(_values("proxied", auth="false")) == [
        ("MLFLOW_TRACKING_URI", "https://mlflow.example.com:8443"), *PART_SIZES.items()]


def test_direct_clients_get_s3_settings_shell_quoted():
    text = client_env.render(_values("direct"), TLS)
    assert "export MLFLOW_S3_ENDPOINT_URL=https://mlflow.example.com:9000" in text
    assert "export AWS_SECRET_ACCESS_KEY='it'\"'\"'s secret'" in text
    assert "export AWS_CA_BUNDLE=/s/certs/ca-bundle.pem" in text
    assert "MLFLOW_MULTIPART" not in text  # boto3 moves parts of its own


def test_direct_clients_of_an_outside_store_get_its_endpoint_and_region():
    env = dict(client_env.client_env({**_values("direct"), "S3_ENDPOINT_URL": "https://s3.eu-central-1.amazonaws.com",
                                      "S3_REGION": "eu-central-1"}))
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "https://s3.eu-central-1.amazonaws.com"
    assert env["AWS_DEFAULT_REGION"] == "eu-central-1"


def test_the_readmes_example_is_what_a_default_deploy_prints():
    """README.md's quick start copies the printed settings (the part sizes included)."""
    from stack.paths import ROOT

    values = {**_values("proxied"), "MLFLOW_PUBLIC_HOST": "localhost", "MLFLOW_ADMIN_PASSWORD": "...generated..."}
    tls = {"ca": "/srv/mlflow-stack/certs/ca.crt", "bundle": "/srv/mlflow-stack/certs/ca-bundle.pem"}
    printed = [line for line in client_env.render(values, tls).splitlines() if line.startswith("export ")]
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("The deploy ends with the settings a client needs"):]
    block = block[:block.index("```\n\n")]
    assert [line for line in block.splitlines() if line.startswith("export ")] == printed


@pytest.mark.parametrize("mode", ["proxied", "direct"])
def test_a_client_bundle_travels_without_the_admins_secrets_or_this_machines_paths(tmp_path, mode):
    import shutil
    import subprocess

    from stack import tls

    certs = tmp_path / "certs"
    made = tls.ensure({"MLFLOW_PUBLIC_HOST": "mlflow.example.com"}, environ={"STACK_CERT_DIR": str(certs)})
    values = _values(mode)
    client_env.write_bundle(values, made, tmp_path / "bundle", "alice")
    text = "".join(p.read_text() for p in (tmp_path / "bundle").iterdir())
    for secret in (values["MLFLOW_ADMIN_PASSWORD"], values["MINIO_ROOT_PASSWORD"], str(tmp_path)):
        assert secret not in text, secret
    # Handed over: another machine, another folder.
    moved = shutil.move(str(tmp_path / "bundle"), str(tmp_path / "elsewhere"))
    shutil.rmtree(certs)
    script = 'cd /; . "$1/mlflow.env"; env | grep -E "^(MLFLOW|REQUESTS|AWS)_" | sort'
    out = subprocess.run(["bash", "-c", script, "bash", moved], capture_output=True, text=True, check=True).stdout
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com:8443"
    assert env["MLFLOW_TRACKING_USERNAME"] == "alice" and "MLFLOW_TRACKING_PASSWORD" not in env
    assert env["MLFLOW_TRACKING_SERVER_CERT_PATH"] == f"{moved}/ca.crt"
    assert env["REQUESTS_CA_BUNDLE"] == f"{moved}/ca-bundle.pem"
    assert open(env["MLFLOW_TRACKING_SERVER_CERT_PATH"]).read() in open(env["REQUESTS_CA_BUNDLE"]).read()
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env


def test_a_hook_that_lost_its_executable_bit_stops_the_deploy_with_the_fix(tmp_path):
    from stack import preflight

    assert preflight.check_hooks() == []  # the project's own, as git keeps them
    hook = tmp_path / "15-stack-token.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    [check] = preflight.check_hooks((hook,))
    assert not check.ok and "is not executable" in check.detail and check.fix == f"run: chmod +x {hook}"
