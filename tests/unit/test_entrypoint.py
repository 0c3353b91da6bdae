"""The MLflow image's entrypoint: settings derived from the environment."""

import importlib.util
import urllib.parse

import pytest

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("entrypoint", ROOT / "mlflow" / "entrypoint.py")
ep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep)


@pytest.fixture
def environ(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("p@ss:w/rd%?#\n")
    key = tmp_path / "key"
    key.write_text("mlflow-admin")
    secret = tmp_path / "secret"
    secret.write_text("s3-secret-value")
    return {
        "POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow", "POSTGRES_PASSWORD_FILE": str(pw),
        "AWS_ACCESS_KEY_ID_FILE": str(key), "AWS_SECRET_ACCESS_KEY_FILE": str(secret),
        "MLFLOW_BUCKET": "mlflow", "MLFLOW_PUBLIC_HOST": "mlflow.example.com",
        "MLFLOW_PUBLIC_SCHEME": "http", "HTTP_PORT": "8080", "S3_PORT": "9000",
    }


def test_database_uri_quotes_any_password(environ):
    uri = ep.database_uri(environ)
    assert uri.startswith("postgresql+psycopg2://mlflow:")
    parsed = urllib.parse.urlsplit(uri)
    assert urllib.parse.unquote(parsed.password) == "p@ss:w/rd%?#"
    assert parsed.hostname == "db" and parsed.port == 5432 and parsed.path == "/mlflow"


def test_secret_file_problems_are_config_errors(environ, tmp_path):
    environ["POSTGRES_PASSWORD_FILE"] = str(tmp_path / "missing")
    with pytest.raises(ep.ConfigError, match="cannot be read"):
        ep.database_uri(environ)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    environ["POSTGRES_PASSWORD_FILE"] = str(empty)
    with pytest.raises(ep.ConfigError, match="is empty"):
        ep.database_uri(environ)


def test_missing_setting_names_it(environ):
    del environ["MLFLOW_BUCKET"]
    with pytest.raises(ep.ConfigError, match="MLFLOW_BUCKET is not set"):
        ep.artifact_args(environ)


def test_public_names_drive_hosts_cors_and_s3(environ):
    assert ep.s3_endpoint(environ) == "http://mlflow.example.com:9000"
    assert ep.cors_origins(environ) == "http://mlflow.example.com:8080"
    hosts = ep.allowed_hosts(environ).split(",")
    assert "mlflow.example.com:8080" in hosts
    assert "localhost:8080" not in hosts


def test_default_port_is_not_written(environ):
    environ["HTTP_PORT"] = "80"
    assert ep.cors_origins(environ) == "http://mlflow.example.com"


def test_loopback_public_host_allows_loopback_spellings_and_gets_a_relay(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "localhost"
    hosts = ep.allowed_hosts(environ).split(",")
    assert {"localhost:8080", "127.0.0.1:8080", "[::1]:8080"} <= set(hosts)
    assert ep.s3_relay_target(environ) == (9000, "nginx", 9000)


def test_real_host_name_needs_no_relay(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "mlflow.invalid"
    assert ep.s3_relay_target(environ) is None


def test_ipv6_literal_is_bracketed(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "fd00::5"
    assert ep.s3_endpoint(environ) == "http://[fd00::5]:9000"


@pytest.mark.parametrize("mode, expected", [
    ("proxied", ["--serve-artifacts", "--artifacts-destination", "s3://mlflow/artifacts"]),
    ("direct", ["--no-serve-artifacts", "--default-artifact-root", "s3://mlflow/artifacts"]),
])
def test_artifact_modes(environ, mode, expected):
    environ["MLFLOW_ARTIFACTS_MODE"] = mode
    assert ep.artifact_args(environ) == expected


def test_bad_mode_and_workers_are_refused(environ):
    environ["MLFLOW_ARTIFACTS_MODE"] = "ftp"
    with pytest.raises(ep.ConfigError, match="proxied"):
        ep.artifact_args(environ)
    environ["MLFLOW_ARTIFACTS_MODE"] = "proxied"
    environ["MLFLOW_WORKERS"] = "many"
    with pytest.raises(ep.ConfigError, match="MLFLOW_WORKERS"):
        ep.server_argv(environ)


def test_secrets_stay_off_the_command_line(environ):
    argv = " ".join(ep.server_argv(environ))
    env = ep.server_environment(environ)
    assert "p%40ss" in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3-secret-value"
    for value in ("p@ss", "p%40ss", "s3-secret-value"):
        assert value not in argv
