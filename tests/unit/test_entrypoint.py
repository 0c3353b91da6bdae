"""The MLflow image's entrypoint: settings derived from the environment."""

import importlib.util
import re
import urllib.parse

import pytest

from stack import settings
from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("entrypoint", ROOT / "mlflow" / "entrypoint.py")
ep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ep)
_spec = importlib.util.spec_from_file_location("relay", ROOT / "mlflow" / "relay.py")
relay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(relay)


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
        "HTTPS_PORT": "8443", "S3_PORT": "9000", "S3_REGION": "us-east-1", "MLFLOW_INTERNAL_URL": "http://mlflow:5000",
        "MLFLOW_AUTH": "true", "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_WORKERS": "2",
        "MLFLOW_ARTIFACTS_MODE": "proxied", "MLFLOW_DEFAULT_PERMISSION": "READ",
        "MLFLOW_AUTH_CACHE_SECONDS": "30", "MLFLOW_ENABLE_JOBS": "false", "MLFLOW_API_MAX_BODY_MB": "64",
        "MLFLOW_ADMIN_PASSWORD_FILE": str(secret), "MLFLOW_FLASK_SECRET_KEY_FILE": str(key),
        "MLFLOW_CRYPTO_KEK_PASSPHRASE_FILE": str(secret),
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
    assert ep.s3_endpoint(environ) == "https://mlflow.example.com:9000"
    assert ep.cors_origins(environ) == "https://mlflow.example.com:8443"
    hosts = ep.allowed_hosts(environ).split(",")
    assert "mlflow.example.com:8443" in hosts
    assert "localhost:8443" not in hosts


def test_default_port_is_not_written(environ):
    environ["HTTPS_PORT"] = "443"
    assert ep.cors_origins(environ) == "https://mlflow.example.com"


def test_loopback_public_host_allows_loopback_spellings_and_gets_a_relay(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "localhost"
    hosts = ep.allowed_hosts(environ).split(",")
    assert {"localhost:8443", "127.0.0.1:8443", "[::1]:8443"} <= set(hosts)
    assert ep.s3_relay_target(environ) == (9000, "nginx", 9000)


def test_real_host_name_needs_no_relay(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "mlflow.invalid"
    assert ep.s3_relay_target(environ) is None


def test_an_object_store_outside_the_stack_is_reached_as_named_without_relay(environ):
    environ.update(MLFLOW_PUBLIC_HOST="localhost", S3_ENDPOINT_URL="https://s3.eu-central-1.amazonaws.com/",
                   S3_REGION="eu-central-1")
    assert ep.s3_relay_target(environ) is None
    env = ep.s3_environment(environ)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "https://s3.eu-central-1.amazonaws.com"
    assert env["AWS_DEFAULT_REGION"] == "eu-central-1"


def test_ipv6_literal_is_bracketed(environ):
    environ["MLFLOW_PUBLIC_HOST"] = "fd00::5"
    assert ep.s3_endpoint(environ) == "https://[fd00::5]:9000"


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


def test_secrets_stay_off_the_command_line(environ, tmp_path):
    argv = " ".join(ep.server_argv(environ))
    env = ep.server_environment(environ, runtime_dir=str(tmp_path / "rt"))
    assert "p%40ss" in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3-secret-value"
    for value in ("p@ss", "p%40ss", "s3-secret-value"):
        assert value not in argv


def test_the_connection_pools_keep_what_they_open(environ, tmp_path, monkeypatch):
    """MLflow's own engine factory, given the server's environment, makes pools that keep
    nearly every connection (an overflow one is closed after one use), and whose most is
    what stack/settings.py sizes PostgreSQL's max_connections by (three stores a worker)."""
    from unittest import mock

    import mlflow.store.db.utils as db_utils

    env = ep.server_environment(environ, runtime_dir=str(tmp_path / "rt"))
    for key in ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"):
        monkeypatch.setenv(key, env[key])
    with mock.patch.object(db_utils.sqlalchemy, "create_engine") as create_engine:
        db_utils.create_sqlalchemy_engine("postgresql://u:p@db:5432/mlflow")
    kwargs = create_engine.call_args.kwargs
    assert kwargs["pool_size"] >= 10 and kwargs["max_overflow"] <= 2, kwargs
    assert 3 * (kwargs["pool_size"] + kwargs["max_overflow"]) == settings.CONNECTIONS_PER_WORKER


def test_auth_on_writes_a_private_ini_for_its_own_database(environ, tmp_path):
    environ["MLFLOW_DEFAULT_PERMISSION"] = "NO_PERMISSIONS"
    env = ep.server_environment(environ, runtime_dir=str(tmp_path / "rt"))
    ini = tmp_path / "rt" / "basic_auth.ini"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(ini)
    assert oct(ini.stat().st_mode & 0o777) == "0o600"
    text = ini.read_text()
    assert "default_permission = NO_PERMISSIONS" in text
    assert "@db:5432/mlflow_auth" in text and "%%" in text  # configparser needs % doubled
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "s3-secret-value"
    assert env["MLFLOW_STACK_AUTH"] == "true"
    assert "--app-name stack" in " ".join(ep.server_argv(environ))


def test_auth_off_sets_no_auth_config(environ, tmp_path):
    environ["MLFLOW_AUTH"] = "false"
    env = ep.server_environment(environ, runtime_dir=str(tmp_path / "rt"))
    assert env["MLFLOW_STACK_AUTH"] == "false" and "MLFLOW_AUTH_CONFIG_PATH" not in env
    environ["MLFLOW_AUTH"] = "maybe"
    with pytest.raises(ep.ConfigError, match="true or false"):
        ep.auth_enabled(environ)


def test_stack_certificate_is_added_to_the_ca_bundle(environ, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nlocal\n-----END CERTIFICATE-----\n")
    environ["STACK_TLS_TRUST"] = str(ca)
    env = ep.server_environment(environ, runtime_dir=str(tmp_path / "rt"))
    bundle = open(env["AWS_CA_BUNDLE"]).read()
    assert bundle.endswith(ca.read_text()) and bundle.count("BEGIN CERTIFICATE") > 10


def test_base_path_moves_the_server_and_its_healthcheck(environ):
    assert "--static-prefix" not in ep.server_argv(environ)
    environ["MLFLOW_BASE_PATH"] = "/mlflow"
    argv = ep.server_argv(environ)
    assert argv[argv.index("--static-prefix") + 1] == "/mlflow"
    environ["MLFLOW_BASE_PATH"] = "mlflow/"
    with pytest.raises(ep.ConfigError, match="leading /"):
        ep.server_argv(environ)


def _gateway_store(tmp_path, monkeypatch, passphrase=None):
    """A SQLite tracking store (MLflow's own schema) with one stored gateway secret."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if passphrase is None:
        monkeypatch.delenv("MLFLOW_CRYPTO_KEK_PASSPHRASE", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_CRYPTO_KEK_PASSPHRASE", passphrase)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = SqlAlchemyStore(uri, str(tmp_path / "artifacts"))
    info = store.create_gateway_secret("openai-key", {"api_key": "sk-very-secret"}, provider="openai")
    return uri, store, info.secret_id


def _wrapped(uri):
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    with engine.connect() as conn:
        rows = {r[0]: bytes(r[1]) for r in conn.execute(sa.text("SELECT secret_id, wrapped_dek FROM secrets"))}
    engine.dispose()
    return rows


def test_gateway_secrets_under_mlflows_builtin_key_move_to_ours_once(tmp_path, monkeypatch):
    uri, store, secret_id = _gateway_store(tmp_path, monkeypatch)
    ours = "a-generated-passphrase-of-this-installation"
    assert ep.rewrap_gateway_secrets(uri, ours) == 1
    monkeypatch.setenv("MLFLOW_CRYPTO_KEK_PASSPHRASE", ours)
    assert store._get_decrypted_secret(secret_id) == {"api_key": "sk-very-secret"}
    # The built-in key opens it no more.
    monkeypatch.delenv("MLFLOW_CRYPTO_KEK_PASSPHRASE")
    with pytest.raises(Exception):
        store._get_decrypted_secret(secret_id)
    # A re-run changes nothing.
    before = _wrapped(uri)
    assert ep.rewrap_gateway_secrets(uri, ours) == 0
    assert _wrapped(uri) == before


def test_gateway_secrets_under_another_installations_key_stop_the_migration_unchanged(tmp_path, monkeypatch):
    uri, _store, _ = _gateway_store(tmp_path, monkeypatch, passphrase="the-other-installations-passphrase")
    before = _wrapped(uri)
    with pytest.raises(ep.ConfigError, match="openai-key.*other than this installation's MLFLOW_CRYPTO_KEK_PASSPHRASE"
                                             ".*drop-unreadable-gateway-secrets"):
        ep.rewrap_gateway_secrets(uri, "a-generated-passphrase-of-this-installation")
    assert _wrapped(uri) == before
    # The passphrase is lost: the explicit way out removes only what no key opens.
    ep.rewrap_gateway_secrets(uri, "a-generated-passphrase-of-this-installation", drop_unreadable=True)
    assert _wrapped(uri) == {}


def test_a_secret_at_another_key_version_is_rewrapped_to_the_servers(tmp_path, monkeypatch):
    """The server opens every secret with its one KEK version (MLFLOW_CRYPTO_KEK_VERSION)."""
    ours = "a-generated-passphrase-of-this-installation"
    monkeypatch.setenv("MLFLOW_CRYPTO_KEK_VERSION", "2")
    uri, store, secret_id = _gateway_store(tmp_path, monkeypatch, passphrase=ours)  # stored at version 2
    monkeypatch.delenv("MLFLOW_CRYPTO_KEK_VERSION")
    assert ep.rewrap_gateway_secrets(uri, ours) == 1
    assert store._get_decrypted_secret(secret_id) == {"api_key": "sk-very-secret"}


def test_no_gateway_table_no_work(tmp_path):
    assert ep.rewrap_gateway_secrets(f"sqlite:///{tmp_path / 'empty.db'}", "a-generated-passphrase") == 0


def test_the_server_exposes_prometheus_metrics_from_every_worker(environ):
    argv = ep.server_argv(environ)
    assert argv[argv.index("--expose-prometheus") + 1] == ep.metrics_dir()


def test_only_the_server_command_resets_the_metrics_and_starts_their_port():
    """The healthcheck runs every few seconds: it must not wipe the workers' counters."""
    import inspect

    assert "metrics_dir()" in inspect.getsource(ep.cmd_server)
    for name, command in ep.COMMANDS.items():
        if name not in ("server", "metrics"):
            assert "metrics_dir" not in inspect.getsource(command), name


def test_the_healthcheck_reports_a_database_that_does_not_answer(monkeypatch, tmp_path):
    """MLflow's /health does not ask the database; the healthcheck does (and says why, without the password)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    password = tmp_path / "pw"
    password.write_text("s3cret-pw\n")
    for key, value in {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(closed_port), "POSTGRES_USER": "mlflow",
                       "POSTGRES_DB": "mlflow", "POSTGRES_PASSWORD_FILE": str(password)}.items():
        monkeypatch.setenv(key, value)
    problem = ep.database_answers(timeout=2)
    assert problem.startswith("the database does not answer:") and "s3cret-pw" not in problem


def test_the_relay_skips_an_address_that_does_not_answer(monkeypatch):
    """On a swarm the relay's target (nginx) resolves to a task per node; one on a lost node
    stays listed for a while and answers nothing. The relay gives each address 2 s."""
    import asyncio
    import socket
    import time

    async def scenario():
        async def accept(reader, writer):
            writer.write(b"live")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        dead = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))
        live = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))

        async def both(*_args, **_kw):
            return [dead, live]

        real_open = asyncio.open_connection

        async def open_connection(host, port, **kw):
            if host == "192.0.2.1":  # a lost node: no answer, no reset
                await asyncio.sleep(3600)
            return await real_open(host, port, **kw)

        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", both)
        monkeypatch.setattr(relay.asyncio, "open_connection", open_connection)
        monkeypatch.setattr(relay.random, "shuffle", lambda items: None)  # the dead one first
        started = time.monotonic()
        reader, writer = await relay._connect_any("nginx", port)
        got = await reader.read()
        writer.close()
        server.close()
        return got, time.monotonic() - started

    got, took = asyncio.run(scenario())
    assert got == b"live"
    assert took >= relay.RELAY_CONNECT_SECONDS  # it waited for the silent one, then went on


# --- check-stores: what a store outside the stack says, and what the user is told --

class FakeS3:
    def __init__(self, error=None, keys=(), prefixes=()):
        self.error, self.keys, self.prefixes = error, keys, prefixes

    def head_bucket(self, Bucket):
        if self.error:
            from botocore.exceptions import ClientError
            code, headers = self.error
            raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": int(code) if
                               code.isdigit() else 400, "HTTPHeaders": headers}}, "HeadBucket")

    def list_objects_v2(self, **_kw):
        return {"Contents": [{"Key": k} for k in self.keys], "CommonPrefixes": [{"Prefix": p} for p in self.prefixes]}


@pytest.mark.parametrize("fake, expected", [
    (FakeS3(("404", {})), None),
    (FakeS3(prefixes=["artifacts/"]), None),
    (FakeS3(("403", {})), "refused MINIO_ROOT_USER/MINIO_ROOT_PASSWORD"),
    (FakeS3(("301", {"x-amz-bucket-region": "eu-west-1"})), "another region (eu-west-1): set S3_REGION"),
    (FakeS3(keys=["report.pdf"], prefixes=["artifacts/"]), "a bucket of its own"),
    (FakeS3(prefixes=["artifacts/", "backups/"]), "a bucket of its own"),
])
def test_check_stores_says_what_is_wrong_with_an_outside_bucket(environ, monkeypatch, fake, expected):
    environ["S3_ENDPOINT_URL"] = "https://s3.example.com"
    monkeypatch.setattr(ep.os, "environ", environ)
    monkeypatch.setattr(ep.common, "s3_client", lambda **_kw: fake)
    problems = ep.s3_problems()
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0] and "https://s3.example.com" in problems[0], problems


class FakeConn:
    def __init__(self, rows):
        self.rows = list(rows)

    def cursor(self):
        conn = self

        class Cursor:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def execute(self, *_a):
                pass

            def fetchone(self):
                return conn.rows.pop(0)
        return Cursor()

    def close(self):
        pass


@pytest.mark.parametrize("failure, rows, expected", [
    ('FATAL:  password authentication failed for user "mlflow"', None, ["refused the role 'mlflow' with POSTGRES_PASSWORD"]),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.9"', None,
     ["into the database 'mlflow' from this machine", "into the database 'postgres' from this machine"]),
    ('FATAL:  database "mlflow" does not exist', None, ["has no database 'mlflow'", "has no database 'postgres'"]),
    ('FATAL:  permission denied for database "mlflow"', None,
     ["may not connect to the database 'mlflow'", "may not connect to the database 'postgres'"]),
    ("could not translate host name", None, ["does not answer from the stack's containers (could not translate"]),
    (None, [(True,), (True,), (200,)], []),
    (None, [(False,), (True,), (200,)], ["ALTER ROLE mlflow CREATEDB"]),
    (None, [(True,), (False,), (200,)], ["ALTER DATABASE mlflow OWNER TO mlflow"]),
    (None, [(True,), (True,), (100,)], ["allows 100 connections (max_connections) and the stack may open up to 110"]),
])
def test_check_stores_says_what_is_wrong_with_an_outside_database(environ, monkeypatch, failure, rows, expected):
    import psycopg2

    environ.update(POSTGRES_HOST="pg.example.com", POSTGRES_PORT="6432", STACK_CONNECTIONS_NEEDED="110")
    monkeypatch.setattr(ep.os, "environ", environ)

    def connect(**kw):
        assert kw["host"] == "pg.example.com" and kw["port"] == "6432"
        if failure:
            raise psycopg2.OperationalError(failure)
        return FakeConn(rows if kw["dbname"] == "mlflow" else [])

    monkeypatch.setattr(psycopg2, "connect", connect)
    problems = ep.postgres_problems()
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected):
        assert "pg.example.com:6432" in problem and words in problem, problem


def test_check_stores_fails_on_problems_and_only_says_warnings(monkeypatch, capsys):
    monkeypatch.setattr(ep, "postgres_problems", lambda: [ep.WARNING + "few connections"])
    monkeypatch.setattr(ep, "s3_problems", lambda: [])
    assert ep.cmd_check_stores(["postgres", "s3"]) == 0
    assert "check-stores: warning: few connections" in capsys.readouterr().err
    monkeypatch.setattr(ep, "s3_problems", lambda: ["refused"])
    assert ep.cmd_check_stores(["postgres", "s3"]) == 1


_CHILD = """
import signal, sys, time
def stop(signum, _frame):
    print(f"child got {signum} at {time.monotonic():.3f}", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
print("child up", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_stop_signal_reaches_the_server_only_after_the_drain(tmp_path, signals):
    """serve_then_drain in a process of its own: SIGTERM to it, the server (a child that
    says when it got the signal) runs on for the drain, then gets the same signal; its
    exit code is the entrypoint's. A second signal cuts the drain short."""
    import signal
    import subprocess
    import sys
    import time

    runner = (f"import importlib.util, sys, time\n"
              f"spec = importlib.util.spec_from_file_location('ep', {str(ROOT / 'mlflow' / 'entrypoint.py')!r})\n"
              f"ep = importlib.util.module_from_spec(spec); spec.loader.exec_module(ep)\n"
              f"sys.exit(ep.cmd_serve_then_drain(['1.5', sys.executable, '-c', {_CHILD!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == "child up"
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    if signals == 2:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
    lines = [line.strip() for line in proc.stdout]
    assert proc.wait(timeout=20) == 3
    assert lines[0].startswith("entrypoint: stopping: serving 1.5 s more"), lines
    got = float(lines[1].split(" at ")[1])
    assert lines[1].startswith(f"child got {int(signal.SIGTERM)} at ")
    if signals == 1:
        assert 1.4 <= got - sent < 5, got - sent
    else:
        assert 0.3 <= got - sent < 1.0, got - sent


def test_a_role_password_goes_to_postgresql_as_a_scram_verifier_only():
    fixed = ep.scram_verifier("s3cret", salt=b"0123456789abcdef")
    assert fixed == ep.scram_verifier("s3cret", salt=b"0123456789abcdef")
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}", fixed), fixed
    assert "s3cret" not in fixed and ep.scram_verifier("s3cret") != fixed
