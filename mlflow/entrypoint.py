#!/usr/bin/env python3
"""Shared entrypoint of the MLflow image (pip and conda variants).

Subcommands:
  server        run the tracking server (the default)
  migrate       bring the database schema up to date (`mlflow db upgrade`), then exit
  init-bucket   create the artifact bucket if it is missing, then exit
  schema-status print "empty", "current", "outdated DB HEAD" or "newer DB HEAD" (exit 0)
  check-stores [postgres] [s3]
                exit 0 when the stores outside the stack (POSTGRES_HOST, S3_ENDPOINT_URL) take its credentials
  healthcheck   exit 0 when the server answers /health, the database a query (and the S3 relay, if any, accepts)
  forward       internal: relay a loopback port to another host (see s3_relay_target)
  serve-then-drain SECONDS ARGV...
                internal: run the server ARGV; asked to stop, serve SECONDS more first (on a swarm)
  metrics PORT  internal: serve the server workers' Prometheus metrics on PORT
  nginx-metrics count nginx's requests from its syslog lines, for Prometheus (nginx_metrics.py);
                nginx-metrics-health: exit 0 while it answers
  drop-unreadable-gateway-secrets
                delete stored AI-gateway secrets that no known passphrase opens (lost key)
  gc [--dry-run] [--older-than DAYS]
                remove runs, experiments and logged models deleted long enough ago (maintenance.py)
  gc-schedule   gc every GC_INTERVAL_HOURS;  gc-health: exit 0 while its last good run is recent

Secrets arrive as files (`*_FILE`, Docker secrets) and are only ever put into
this process's environment, never on a command line, so that neither
`docker inspect` nor `docker top` shows them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from stack import common, settings
from stack.common import ConfigError, env, host_port, secret

SCHEME = "https"  # nginx serves the stack over TLS only


def setting(key: str, environ=None) -> str:
    """A .env setting passed in by Compose, checked with the rule of stack/settings.py."""
    value = env(key, environ=environ)
    try:
        return settings.value(key, {key: value})
    except settings.SettingError as exc:
        raise ConfigError(str(exc)) from None


def server_port(environ=None) -> int:
    """The port nginx and the backup job reach the server on (MLFLOW_INTERNAL_URL)."""
    return urllib.parse.urlsplit(env("MLFLOW_INTERNAL_URL", environ=environ)).port or 80


def public_origin(environ=None) -> tuple[str, int]:
    return setting("MLFLOW_PUBLIC_HOST", environ), int(setting("HTTPS_PORT", environ))


def auth_enabled(environ=None) -> bool:
    return setting("MLFLOW_AUTH", environ) == "true"


def s3_endpoint(environ=None) -> str:
    """The S3 endpoint as clients outside see it (nginx's S3 port).

    MLflow signs presigned URLs for this endpoint, so it must be the public
    one: a client follows the URL as given, and SigV4 signs the Host header.
    A store outside the stack (S3_ENDPOINT_URL) is reached as it is named.
    """
    outside = common.external_s3(environ)
    if outside:
        return outside
    host, _ = public_origin(environ)
    return f"{SCHEME}://{host_port(host, setting('S3_PORT', environ), SCHEME)}"


def allowed_hosts(environ=None) -> str:
    host, port = public_origin(environ)
    hosts = [host_port(host, port, SCHEME), host]
    if common.resolves_to_loopback(host):
        # On the stack's own machine, any loopback spelling reaches nginx.
        hosts += [host_port(h, port, SCHEME) for h in ("localhost", "127.0.0.1", "::1")]
    # The healthcheck and in-network callers use the server's own address.
    internal = urllib.parse.urlsplit(env("MLFLOW_INTERNAL_URL", environ=environ))
    own = server_port(environ)
    hosts += [f"localhost:{own}", f"127.0.0.1:{own}", f"{internal.hostname}:{own}"]
    return ",".join(dict.fromkeys(hosts))


def cors_origins(environ=None) -> str:
    host, port = public_origin(environ)
    return f"{SCHEME}://{host_port(host, port, SCHEME)}"


def artifact_args(environ=None) -> list[str]:
    root = f"s3://{setting('MLFLOW_BUCKET', environ)}/{common.ARTIFACTS_PREFIX}"
    if setting("MLFLOW_ARTIFACTS_MODE", environ) == "proxied":
        return ["--serve-artifacts", "--artifacts-destination", root]
    return ["--no-serve-artifacts", "--default-artifact-root", root]


def base_path(environ=None) -> str:
    """MLFLOW_BASE_PATH: empty (MLflow at the root) or a prefix such as /mlflow."""
    if not (os.environ if environ is None else environ).get("MLFLOW_BASE_PATH"):
        return ""
    return setting("MLFLOW_BASE_PATH", environ)


# Each container's own (a tmpfs owned by the image's user, docker-compose.yml):
# the auth ini, the CA bundle and the workers' metric files. /tmp is the
# mlflow-tmp volume, which the replicas (MLFLOW_REPLICAS) share for uploads.
RUNTIME_DIR = "/run/mlflow-stack"


def metrics_dir(runtime_dir: str = RUNTIME_DIR) -> str:
    """Where the server's workers keep their Prometheus counters (one file set each)."""
    return os.path.join(runtime_dir, "metrics")


def server_argv(environ=None) -> list[str]:
    prefix = base_path(environ)
    return [
        "mlflow", "server",
        "--host", "0.0.0.0",
        "--port", str(server_port(environ)),
        "--workers", setting("MLFLOW_WORKERS", environ),
        # The stack's app: MLflow (with basic-auth when on) behind input checks.
        "--app-name", "stack",
        *(["--static-prefix", prefix] if prefix else []),
        # Request counts and latencies of every worker; read on the internal
        # metrics port (cmd_metrics), not through nginx.
        "--expose-prometheus", metrics_dir(),
        *artifact_args(environ),
    ]


def s3_environment(environ=None) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": secret("AWS_ACCESS_KEY_ID", environ),
        "AWS_SECRET_ACCESS_KEY": secret("AWS_SECRET_ACCESS_KEY", environ),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(environ),
        "AWS_DEFAULT_REGION": setting("S3_REGION", environ),
    }


def trust_environment(environ, runtime_dir: str) -> dict[str, str]:
    """The server's own S3 calls go to the public (TLS) endpoint: trust the
    stack's certificate on top of the usual CAs."""
    trust = (environ or os.environ).get("STACK_TLS_TRUST", "")
    if not (trust and os.path.isfile(trust)):
        return {}
    bundle = common.write_ca_bundle(Path(trust), Path(runtime_dir) / "ca-bundle.pem")
    return {"AWS_CA_BUNDLE": str(bundle)}


def auth_ini(environ) -> str:
    return ("[mlflow]\n"
            f"default_permission = {setting('MLFLOW_DEFAULT_PERMISSION', environ)}\n"
            f"database_uri = {auth_database_uri(environ).replace('%', '%%')}\n"
            f"admin_username = {setting('MLFLOW_ADMIN_USERNAME', environ)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {setting('MLFLOW_AUTH_CACHE_SECONDS', environ)}\n"
            "auth_cache_max_size = 10000\n")


def auth_environment(environ, runtime_dir: str) -> dict[str, str]:
    """basic-auth's settings: its ini (private to this container) and the admin's login."""
    if not auth_enabled(environ):
        return {}
    ini = os.path.join(runtime_dir, "basic_auth.ini")
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(auth_ini(environ))
    return {
        "MLFLOW_AUTH_CONFIG_PATH": ini,
        "MLFLOW_AUTH_ADMIN_USERNAME": setting("MLFLOW_ADMIN_USERNAME", environ),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret("MLFLOW_ADMIN_PASSWORD", environ),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret("MLFLOW_FLASK_SECRET_KEY", environ),
    }


def server_environment(environ=None, runtime_dir: str = RUNTIME_DIR) -> dict[str, str]:
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    return {
        **s3_environment(environ),
        "MLFLOW_BACKEND_STORE_URI": database_uri(environ),
        "MLFLOW_SERVER_ALLOWED_HOSTS": allowed_hosts(environ),
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": cors_origins(environ),
        "MLFLOW_STACK_AUTH": "true" if auth_enabled(environ) else "false",
        # The job runner costs ~1.6 GiB; only needed for MLflow's async jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": setting("MLFLOW_ENABLE_JOBS", environ),
        "MLFLOW_API_MAX_BODY_MB": setting("MLFLOW_API_MAX_BODY_MB", environ),
        # The same most connections as SQLAlchemy's default pool, nearly all kept open (stack/settings.py).
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(settings.POOL_SIZE),
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(settings.MAX_OVERFLOW),
        # Wraps the AI gateway's stored secrets; MLflow's fallback is the same everywhere.
        "MLFLOW_CRYPTO_KEK_PASSPHRASE": secret("MLFLOW_CRYPTO_KEK_PASSPHRASE", environ),
        **trust_environment(environ, runtime_dir),
        **auth_environment(environ, runtime_dir),
    }


def database_uri(environ=None) -> str:
    return common.database_uri(environ)


def auth_database_uri(environ=None) -> str:
    return common.database_uri(environ, dbname=common.auth_database(environ))


def s3_relay_target(environ=None) -> tuple[int, str, int] | None:
    """(local port, target host, target port) when the public S3 host is loopback here.

    A client on the host reaches nginx at localhost:S3_PORT; inside this
    container localhost is the container itself, so the same URL would miss
    nginx. A relay on that loopback port to nginx keeps one URL valid for
    both, Host header included. A real host name needs no relay: compose
    gives nginx that name as a network alias.
    """
    host, _ = public_origin(environ)
    if common.external_s3(environ) or not common.resolves_to_loopback(host):
        return None
    port = int(setting("S3_PORT", environ))
    return port, env("S3_RELAY_HOST", "nginx", environ=environ), port


def cmd_metrics(args: list[str]) -> int:
    """Serve the workers' Prometheus metrics on the internal port, to Prometheus only.

    MLflow's own /metrics sits behind basic-auth and the Host check; this port is
    not published and nginx refuses /metrics. Every container on the stack's
    networks can reach it, so it asks for STACK_METRICS_TOKEN (Prometheus sends it as
    a bearer token) and answers 401 without it; the container's own loopback too."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
    from socketserver import ThreadingMixIn

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir())
    app = bearer_only(make_wsgi_app(registry), secret("STACK_METRICS_TOKEN"))

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *_args):  # a scrape every 15 s is not news
            pass

    make_server("", int(args[0]), app, server_class=Server, handler_class=Quiet).serve_forever()
    return 0


def bearer_only(app, token: str):
    """A WSGI app that answers 401 unless the request carries `Authorization: Bearer <token>`."""
    import hmac

    expected = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"Prometheus's bearer token (STACK_METRICS_TOKEN) is needed here.\n"]
        return app(environ, start_response)

    return guarded


def cmd_nginx_metrics(_args: list[str]) -> int:
    import nginx_metrics

    nginx_metrics.serve(common.NGINX_EXPORTER_SYSLOG_PORT, common.NGINX_EXPORTER_METRICS_PORT)
    return 0


def cmd_nginx_metrics_health(_args: list[str]) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{common.NGINX_EXPORTER_METRICS_PORT}/metrics", timeout=4):
            return 0
    except OSError as exc:
        print(f"nginx-metrics: not answering: {exc}", file=sys.stderr)
        return 1


def cmd_forward(args: list[str]) -> int:
    import relay

    relay.serve(int(args[0]), args[1], int(args[2]))
    return 0


def cmd_server(_args: list[str]) -> int:
    os.environ.update(server_environment())
    # After the environment: importing MLflow's auth package reads its config once.
    if os.environ.get("STACK_WAIT_FOR_SCHEMA") == "true":
        wait_for_schema()
    if auth_enabled():
        # What `mlflow server --app-name basic-auth` does before starting
        # workers; with the stack's own app name it is done here, once
        # (mlflow/internals.py checks the name).
        from mlflow.server import _bootstrap_basic_auth

        _bootstrap_basic_auth()
    else:
        print("entrypoint: WARNING: authentication is OFF (MLFLOW_AUTH=false); anyone who can "
              "reach the server can read and change everything", file=sys.stderr, flush=True)
    # Counters of an earlier run would add up wrongly.
    shutil.rmtree(metrics_dir(), ignore_errors=True)
    os.makedirs(metrics_dir(), mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir()
    subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [sys.executable, __file__, "metrics", env("MLFLOW_METRICS_PORT")], close_fds=True
    )
    relay_target = s3_relay_target()
    if relay_target:
        subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, __file__, "forward", *map(str, relay_target)], close_fds=True
        )
    argv = server_argv()
    print(f"entrypoint: starting {' '.join(argv)}", flush=True)
    drain = int(os.environ.get("STACK_STOP_DRAIN_SECONDS") or 0)
    if drain <= 0:
        os.execvp(argv[0], argv)
    # A fresh process that stays as PID 1 while the server runs: not this one, which has
    # imported MLflow (about 200 MiB) and may hold a pooled database connection.
    os.execv(sys.executable, [sys.executable, __file__, "serve-then-drain", str(drain), *argv])
    return 1  # not reached


def cmd_serve_then_drain(args: list[str]) -> int:
    return serve_then_drain(args[1:], float(args[0]))


def serve_then_drain(argv: list[str], drain: float) -> int:
    """Run the server; asked to stop, let it serve `drain` seconds more, then pass the signal
    on (at once on a second signal).

    Swarm takes a stopping task out of its DNS first, but nginx keeps the addresses it
    resolved for NGINX_DNS_SECONDS. A server that stopped at once would leave its listening
    socket open (uvicorn's supervisor holds it) while no worker accepts: a request sent
    there waits for nothing until the task is killed (seen in a rolling update: an upload
    cut after 9.4 s with a 502, a metric call resent after 9.9 s). Meanwhile it is served."""
    import signal
    import threading

    asked = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        asked.set()

    # Before the server starts: PID 1 ignores a signal it has no handler for.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(argv)  # noqa: S603 - fixed argv, no shell
    while child.poll() is None and not asked.wait(0.5):
        pass
    if child.poll() is None:
        print(f"entrypoint: stopping: serving {drain:g} s more, until nginx has forgotten this "
              "server's address", flush=True)
        deadline = time.monotonic() + drain
        while child.poll() is None and time.monotonic() < deadline and len(received) < 2:
            time.sleep(0.2)
        if child.poll() is None:
            child.send_signal(received[0])
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def cmd_migrate(_args: list[str]) -> int:
    from mlflow.db import upgrade

    # `mlflow db upgrade URI`, called in-process so that the URI (with its
    # password) never appears on a command line. It creates the tables on an
    # empty database and is a no-op on a current one.
    print("migrate: bringing the MLflow schema up to date", flush=True)
    upgrade.callback(database_uri())
    print("migrate: schema is current", flush=True)
    rewrap_gateway_secrets(database_uri(), secret("MLFLOW_CRYPTO_KEK_PASSPHRASE"))
    if auth_enabled():
        ensure_auth_database()
    ensure_roles()
    return 0


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 form of a password (RFC 5802/7677), as `\\password`
    sends it: ALTER ROLE then carries no password that a log line could show."""
    import base64
    import hashlib
    import hmac

    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


# What the server's role may do in MLflow's databases: rows, not the schema. The
# default privileges cover tables a later migration adds (made by POSTGRES_USER).
SERVER_GRANTS = (
    "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role}",
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
    "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
    "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {role}",
)


def ensure_roles() -> None:
    """The server's, gc's and the exporter's own roles on the stack's PostgreSQL, with
    what they may do; their passwords set only when they do not already log in (a
    re-run changes nothing). With POSTGRES_HOST (the server role is POSTGRES_USER) none."""
    import psycopg2
    from psycopg2 import sql

    owner = env("POSTGRES_USER")
    server = env("POSTGRES_SERVER_ROLE")
    if server == owner:
        print("migrate: PostgreSQL outside the stack: the services log in as POSTGRES_USER", flush=True)
        return
    monitor = env("POSTGRES_MONITOR_ROLE")
    wanted = {server: secret("POSTGRES_SERVER_PASSWORD"), monitor: secret("POSTGRES_MONITOR_PASSWORD")}
    params = common.postgres_params({k: v for k, v in os.environ.items() if k != "POSTGRES_ROLE"})
    conn = psycopg2.connect(**params)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for role, password in wanted.items():
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
                    print(f"migrate: created the role {role}", flush=True)
                if not logs_in(params, role, password):
                    cur.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(scram_verifier(password))))
                    print(f"migrate: set the password of the role {role}", flush=True)
            cur.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(monitor)))
            databases = [params["dbname"]] + ([common.auth_database()] if auth_enabled() else [])
    finally:
        conn.close()
    for db in databases:
        conn = psycopg2.connect(**{**params, "dbname": db})
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for statement in SERVER_GRANTS:
                    cur.execute(sql.SQL(statement).format(db=sql.Identifier(db), role=sql.Identifier(server),
                                                          owner=sql.Identifier(owner)))
        finally:
            conn.close()
    print(f"migrate: the server and gc log in as {server}, the exporter as {monitor}", flush=True)


def logs_in(params: dict, role: str, password: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(**{**params, "user": role, "password": password}, connect_timeout=10).close()
        return True
    except psycopg2.OperationalError:
        return False


UNREADABLE_FIX = ("If that passphrase is lost, those secrets cannot be recovered: remove them with "
                  "`python3 -m stack compose run --rm --no-deps migrate drop-unreadable-gateway-secrets`, "
                  "then deploy and enter the provider keys again.")


def rewrap_gateway_secrets(uri: str, passphrase: str, drop_unreadable: bool = False) -> int:
    """Put every stored AI-gateway secret under this installation's key.

    MLflow wraps each secret's data key with a key derived from
    MLFLOW_CRYPTO_KEK_PASSPHRASE, or from a built-in passphrase that is the
    same in every installation when that is unset (as it was here before
    the stack generated one). Secrets still under the built-in key are
    re-wrapped (`mlflow crypto rotate-kek` does the same, but also bumps the
    key version and wants the server's settings edited by hand); secrets
    already under ours are left alone, so a re-run changes nothing. One
    transaction: all or nothing. Returns how many were re-wrapped."""
    import sqlalchemy as sa

    from mlflow.utils.crypto import (CRYPTO_KEK_VERSION_ENV_VAR, DEFAULT_KEK_PASSPHRASE, KEKManager,
                                     unwrap_dek, wrap_dek)

    # The server derives its key at one version (MLFLOW_CRYPTO_KEK_VERSION, default 1),
    # whatever a row says: a secret counts as ours only if that key opens it.
    server_version = int(os.environ.get(CRYPTO_KEK_VERSION_ENV_VAR, "1"))
    engine = sa.create_engine(uri)
    try:
        with engine.begin() as conn:
            if not sa.inspect(conn).has_table("secrets"):
                return 0
            rows = conn.execute(sa.text("SELECT secret_id, secret_name, wrapped_dek, kek_version FROM secrets")).all()
            managers: dict[tuple[str, int], KEKManager] = {}

            def kek(which: str, version: int) -> bytes:
                if (which, version) not in managers:
                    managers[which, version] = KEKManager(
                        passphrase=passphrase if which == "ours" else DEFAULT_KEK_PASSPHRASE, kek_version=version)
                return managers[which, version].get_kek()

            def opens(wrapped: bytes, key: bytes) -> bytes | None:
                try:
                    return unwrap_dek(wrapped, key)
                except Exception:  # wrong key: AES-GCM's tag does not verify
                    return None

            moved, foreign = 0, []
            for secret_id, name, wrapped, version in rows:
                wrapped = bytes(wrapped)
                if version == server_version and opens(wrapped, kek("ours", server_version)) is not None:
                    continue
                dek = opens(wrapped, kek("ours", version)) or opens(wrapped, kek("default", version))
                if dek is None:
                    foreign.append((secret_id, name))
                    continue
                conn.execute(sa.text("UPDATE secrets SET wrapped_dek = :w, kek_version = :v WHERE secret_id = :i"),
                             {"w": wrap_dek(dek, kek("ours", server_version)), "v": server_version, "i": secret_id})
                moved += 1
            names = ", ".join(sorted(name for _, name in foreign)[:5])
            if foreign and drop_unreadable:
                for secret_id, _ in foreign:
                    conn.execute(sa.text("DELETE FROM secrets WHERE secret_id = :i"), {"i": secret_id})
                print(f"migrate: removed {len(foreign)} AI-gateway secret(s) no key opens: {names}", flush=True)
            elif foreign:
                raise ConfigError(
                    f"{len(foreign)} stored AI-gateway secret(s) ({names}) are encrypted under a passphrase other "
                    "than this installation's MLFLOW_CRYPTO_KEK_PASSPHRASE (restored from another installation, "
                    "or the passphrase in .env was changed). Put the passphrase they were stored with into .env "
                    f"and run ./stack_deploy.sh again. Nothing was changed. {UNREADABLE_FIX}")
    finally:
        engine.dispose()
    print(f"migrate: AI-gateway secrets: {len(rows)} stored, {moved} moved from MLflow's built-in key "
          "to this installation's", flush=True)
    return moved


def cmd_drop_unreadable_gateway_secrets(_args: list[str]) -> int:
    """Delete the stored AI-gateway secrets that no known key opens (their passphrase is lost)."""
    rewrap_gateway_secrets(database_uri(), secret("MLFLOW_CRYPTO_KEK_PASSPHRASE"), drop_unreadable=True)
    return 0


def ensure_auth_database() -> None:
    """Create the user store's database and schema before any server worker starts
    (workers migrating it concurrently would race)."""
    import psycopg2
    from psycopg2 import sql

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    name = common.auth_database()
    conn = psycopg2.connect(**common.postgres_params())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"migrate: created the user database {name}", flush=True)
    finally:
        conn.close()
    store = SqlAlchemyStore()
    store.init_db(auth_database_uri())
    import stack_logins
    import stack_tokens
    from sqlalchemy import text

    with store.engine.begin() as conn:
        for statement in stack_logins.SCHEMA + stack_tokens.SCHEMA:
            conn.execute(text(statement))
    print(f"migrate: user database {name} is current", flush=True)


def schema_state(engine, uri: str) -> tuple[str, str, str]:
    """("empty" | "current" | "outdated" | "newer", the database's revision, this MLflow's head)."""
    from alembic.script import ScriptDirectory

    from mlflow.store.db.utils import _get_alembic_config, _get_schema_version, _is_empty_database

    scripts = ScriptDirectory.from_config(_get_alembic_config(uri))
    head = scripts.get_current_head()
    if _is_empty_database(engine):
        return "empty", head, head
    current = _get_schema_version(engine)
    if current == head:
        return "current", current, head
    try:
        known = scripts.get_revision(current) is not None
    except Exception:  # noqa: BLE001 - alembic raises several types for unknown revisions
        known = False
    return ("outdated" if known else "newer"), current, head


def cmd_schema_status(_args: list[str]) -> int:
    """How the database schema compares with this image's MLflow (for upgrades)."""
    from mlflow.store.db.utils import create_sqlalchemy_engine_with_retry

    uri = database_uri()
    print(*schema_state(create_sqlalchemy_engine_with_retry(uri), uri))
    return 0


def postgres_problems() -> list[str]:
    """Why the stack cannot use the PostgreSQL server POSTGRES_HOST names (empty: it can)."""
    import psycopg2

    p = common.postgres_params()
    where = f"PostgreSQL at {host_port(p['host'], p['port'], 'postgresql')}"
    problems = []
    # MLflow's database, and the maintenance database the backup lock and restores use.
    for dbname in (p["dbname"], "postgres"):
        try:
            conn = psycopg2.connect(connect_timeout=10, **{**p, "dbname": dbname})
        except psycopg2.OperationalError as exc:
            text = str(exc).strip()
            last = text.splitlines()[-1][:200]
            if "password authentication failed" in text:
                return [f"{where} refused the role {p['user']!r} with POSTGRES_PASSWORD ({last}): set POSTGRES_USER "
                        "and POSTGRES_PASSWORD in .env to a role of that server"]
            if "no pg_hba.conf entry" in text:
                problems.append(f"{where} does not let the role {p['user']!r} into the database {dbname!r} from "
                                f"this machine ({last}): allow this machine's address for it in the server's "
                                "pg_hba.conf (or the service's network rules)")
            elif "permission denied for database" in text:
                problems.append(f"{where}: the role {p['user']!r} may not connect to the database {dbname!r} "
                                f"(backups and restores use it): GRANT CONNECT ON DATABASE {dbname} TO {p['user']};")
            elif "does not exist" in text and "database" in text:
                problems.append(f"{where} has no database {dbname!r}: create it (CREATE DATABASE {dbname} OWNER "
                                f"{p['user']};)" + (" or set POSTGRES_DB in .env to one that exists"
                                                    if dbname == p["dbname"] else ""))
            else:
                return [f"{where} does not answer from the stack's containers ({text.splitlines()[0][:200]}): check "
                        "POSTGRES_HOST and POSTGRES_PORT in .env, and that this machine may reach it"]
            continue
        if dbname != p["dbname"]:
            conn.close()
            continue
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
                may_create = cur.fetchone()[0]
                # Owner, a member of the owning role, or a superuser: each may drop and re-create it.
                cur.execute("SELECT pg_has_role(current_user, datdba, 'MEMBER') OR (SELECT rolsuper FROM pg_roles "
                            "WHERE rolname = current_user) FROM pg_database WHERE datname = current_database()")
                owner = cur.fetchone()[0]
                cur.execute("SELECT current_setting('max_connections')::int")
                limit = cur.fetchone()[0]
        finally:
            conn.close()
        needed = int(os.environ.get("STACK_CONNECTIONS_NEEDED") or 0)
        if limit < needed:
            # Pools at their worst; a stock server's 100 is below the defaults' 110, so this only warns.
            problems.append(f"{WARNING}{where} allows {limit} connections (max_connections) and the stack may open "
                            f"up to {needed} under load (MLFLOW_REPLICAS x MLFLOW_WORKERS x "
                            f"{settings.CONNECTIONS_PER_WORKER}, and {settings.CONNECTIONS_OTHERS} more): requests "
                            "could then fail with 'too many clients'; raise it there, or lower MLFLOW_REPLICAS or "
                            "MLFLOW_WORKERS in .env")
        if not may_create:
            problems.append(f"{where}: the role {p['user']!r} may not create databases, which the stack needs (the "
                            f"user store {common.auth_database()!r}, each backup's check of its dump, restores): "
                            f"ALTER ROLE {p['user']} CREATEDB;")
        if not owner:
            problems.append(f"{where}: the database {p['dbname']!r} is not owned by {p['user']!r}, so the schema "
                            f"cannot be made or restored: ALTER DATABASE {p['dbname']} OWNER TO {p['user']};")
    return problems


def s3_problems() -> list[str]:
    """Why the stack cannot use the S3 store S3_ENDPOINT_URL names (empty: it can)."""
    from botocore.exceptions import BotoCoreError, ClientError

    where, bucket = f"the S3 store at {common.external_s3()}", setting("MLFLOW_BUCKET")
    client = common.s3_client(attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
        # Backups take, and restores replace, the whole bucket: it must be the stack's own.
        top = client.list_objects_v2(Bucket=bucket, Delimiter="/", MaxKeys=50)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket", "NotFound"):
            return []  # init-bucket makes it
        if code in ("301", "PermanentRedirect", "400", "AuthorizationHeaderMalformed"):
            region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            return [f"{where} keeps the bucket {bucket!r} in another region{f' ({region})' if region else ''}: "
                    "set S3_REGION in .env to it"]
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return [f"{where} refused MINIO_ROOT_USER/MINIO_ROOT_PASSWORD for the bucket {bucket!r} ({code}): set "
                    "them in .env to an access key and secret key of that store that may read and write it (on AWS "
                    "also: bucket names are global, and this one may belong to another account)"]
        return [f"{where} answered {code or status} for the bucket {bucket!r}"]
    except BotoCoreError as exc:
        return [f"{where} does not answer from the stack's containers ({exc}): check S3_ENDPOINT_URL in .env, "
                "and that this machine may reach it"]
    others = sorted({o["Key"] for o in top.get("Contents", [])} | {c["Prefix"] for c in top.get("CommonPrefixes", [])}
                    - {common.ARTIFACTS_PREFIX + "/"})
    if others:
        return [f"{where}: the bucket {bucket!r} holds objects the stack did not write (e.g. {', '.join(others[:3])}): backups "
                "would take them and a restore would delete them; give the stack a bucket of its own (MLFLOW_BUCKET)"]
    return []


# Marks a finding that is said but does not stop the deploy.
WARNING = "warning: "


def cmd_check_stores(args: list[str]) -> int:
    """Exit 0 when each store named (postgres, s3: those outside the stack)
    takes the stack's credentials; else one line each on what to fix."""
    findings = [*(postgres_problems() if "postgres" in args else []), *(s3_problems() if "s3" in args else [])]
    for finding in findings:
        print(f"check-stores: {finding}", file=sys.stderr)
    problems = [f for f in findings if not f.startswith(WARNING)]
    if not problems:
        print(f"check-stores: {' and '.join(args)} answer with the stack's credentials", flush=True)
    return 1 if problems else 0


def auth_schema_current() -> bool:
    import sqlalchemy
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from mlflow.server.auth.db.utils import _get_alembic_config

    uri = auth_database_uri()
    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 3}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn, opts={"version_table": "alembic_version_auth"}) \
                .get_current_revision()
    finally:
        engine.dispose()
    return current == ScriptDirectory.from_config(_get_alembic_config(uri)).get_current_head()


def wait_for_schema(timeout: float = 900) -> None:
    """Until the migrate job has brought both schemas to this MLflow's head. Swarm
    has no depends_on (stack/swarm.py sets STACK_WAIT_FOR_SCHEMA); a server that
    started on a half-made schema would fail, or create tables itself, racing the job."""
    import sqlalchemy

    uri = database_uri()
    deadline, said = time.monotonic() + timeout, ""
    while True:
        try:
            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 3},
                                              poolclass=sqlalchemy.pool.NullPool)
            try:
                state = schema_state(engine, uri)[0]
            finally:
                engine.dispose()
            if state == "current" and (not auth_enabled() or auth_schema_current()):
                return
            why = f"the schema is {state}" if state != "current" else "the user database is not ready"
        except Exception as exc:  # noqa: BLE001 - not reachable yet, or the auth database not made yet
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            why = f"the database does not answer yet ({type(exc).__name__}: {first})"
            state = ""
        if state == "newer":
            raise SystemExit("entrypoint: the database schema is newer than this image's MLflow knows: deploy "
                             "the MLflow version that wrote it, or restore a backup made with this one")
        if why != said:
            print(f"entrypoint: waiting for the migrate job: {why}", flush=True)
            said = why
        if time.monotonic() > deadline:
            raise SystemExit(f"entrypoint: gave up after {timeout:.0f} s: {why}; see the migrate job's logs")
        time.sleep(2)


def cmd_init_bucket(_args: list[str]) -> int:
    from botocore.exceptions import BotoCoreError

    # The artifact bucket, and the point-in-time archive's when the stack runs its own
    # PostgreSQL (PITR_BUCKET, set by docker-compose.yml only then).
    # The store straight on the backend network (the server itself uses the
    # public endpoint, see s3_endpoint); few retries, this loop retries.
    client = common.s3_client(attempts=3)
    buckets = [("MLFLOW_BUCKET", setting("MLFLOW_BUCKET"), client)] + [
        ("PITR_BUCKET", b, archive_client()) for b in [os.environ.get("PITR_BUCKET", "")] if b]
    for _ in range(60):
        try:
            while buckets:
                if not ensure_bucket(buckets[0][2], *buckets[0][:2]):
                    return 1
                buckets.pop(0)
            return 0
        except RetryLater as exc:
            print(f"init-bucket: {exc}, retrying", flush=True)
        except BotoCoreError as exc:
            print(f"init-bucket: object store not reachable yet ({type(exc).__name__})",
                  flush=True)
        time.sleep(2)
    where = (f"PITR_S3_ENDPOINT_URL={archive_off_site()} (can this machine's containers reach it?)"
             if buckets and buckets[0][0] == "PITR_BUCKET" and archive_off_site()
             else common.external_s3() or "the minio service")
    print(f"init-bucket: gave up after 120 s; check {where}", file=sys.stderr)
    return 1


def archive_off_site() -> str:
    """PITR_S3_ENDPOINT_URL when the point-in-time archive is on a store of its own, else ""
    (decided once, by stack/settings.py's archive_off_site, and passed as PITR_OFF_SITE)."""
    return os.environ.get("PITR_S3_ENDPOINT", "") if os.environ.get("PITR_OFF_SITE") == "true" else ""


def archive_client():
    """The point-in-time archive's store, with its keys (the artifacts' when it is theirs)."""
    if not archive_off_site():
        return common.s3_client(attempts=3)
    return common.s3_client(environ={**os.environ, "AWS_ACCESS_KEY_ID_FILE": os.environ["PITR_ACCESS_KEY_FILE"],
                                     "AWS_SECRET_ACCESS_KEY_FILE": os.environ["PITR_SECRET_KEY_FILE"],
                                     "S3_REGION": os.environ.get("PITR_S3_REGION", "us-east-1")},
                            endpoint=archive_off_site(), attempts=3)


class RetryLater(Exception):
    """The object store answered with something worth asking again."""


def ensure_bucket(client, name: str, bucket: str) -> bool:
    """Make the bucket (setting `name`) if it is missing. False (with the reason printed)
    when that cannot work."""
    from botocore.exceptions import ClientError

    # On an outside store the archive's bucket is one more the key needs, and bucket names
    # are global there (AWS): the default may be someone else's.
    also = (f" (PITR_BUCKET is the database's point-in-time archive: on {common.external_s3()} set it in "
            ".env to a bucket of yours that the key may use)") if name == "PITR_BUCKET" and common.external_s3() else ""
    if name == "PITR_BUCKET" and archive_off_site():
        also = (f" (PITR_BUCKET is the database's point-in-time archive on {archive_off_site()}, "
                "PITR_S3_ENDPOINT_URL: PITR_S3_ACCESS_KEY and PITR_S3_SECRET_KEY in .env must be a key of that "
                "store that may make or use the bucket)")

    try:
        client.head_bucket(Bucket=bucket)
        print(f"init-bucket: bucket {bucket!r} already exists", flush=True)
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        off_site = name == "PITR_BUCKET" and archive_off_site()
        if code in ("404", "NoSuchBucket", "NotFound"):
            region = os.environ.get("PITR_S3_REGION", "us-east-1") if off_site else setting("S3_REGION")
            # AWS makes buckets in us-east-1 unless told otherwise.
            where = {} if region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": region}}
            try:
                client.create_bucket(Bucket=bucket, **where)
            except ClientError as failed:
                who = "PITR_S3_ACCESS_KEY" if off_site else "MINIO_ROOT_USER"
                print(f"init-bucket: the object store did not create the bucket {bucket!r} "
                      f"({failed.response.get('Error', {}).get('Code', '')}): create it there, or give "
                      f"{who} the right to{also}", file=sys.stderr)
                return False
            print(f"init-bucket: created bucket {bucket!r}", flush=True)
            return True
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            whose = (f"the key of {common.external_s3()}, with access to the bucket" if common.external_s3()
                     else "the ones the minio volume was created with")
            print(f"init-bucket: the object store refused the credentials for {bucket!r} ({code});"
                  + (also if off_site else f" MINIO_ROOT_USER/MINIO_ROOT_PASSWORD in .env must be {whose}{also}"),
                  file=sys.stderr)
            return False
        raise RetryLater(code) from None


def database_answers(timeout: int = 3) -> str | None:
    """None if the backend store takes a query, else why not. MLflow's /health
    answers without asking it, so a database that is down (e.g. crash-looping on
    a full disk) left the server "healthy" while every write failed."""
    import psycopg2

    try:
        conn = psycopg2.connect(connect_timeout=timeout, options=f"-c statement_timeout={timeout * 1000}",
                                **common.postgres_params())
    except psycopg2.Error as exc:
        return f"the database does not answer: {str(exc).strip()}"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    except psycopg2.Error as exc:
        return f"the database does not answer a query: {str(exc).strip()}"
    finally:
        conn.close()
    return None


def cmd_healthcheck(_args: list[str]) -> int:
    # Imported here, not at the top: most other subcommands (e.g. gc-health, every 30 s) need
    # neither; asyncio is in relay.py for the same reason.
    import urllib.error
    import urllib.request

    try:
        # 3 + 2 + 2 s at most: within the healthcheck's timeout (docker-compose.yml), so the reason is kept.
        with urllib.request.urlopen(f"http://127.0.0.1:{server_port()}{base_path()}/health", timeout=3) as r:
            if r.status != 200:
                print(f"the server's /health answered {r.status}")
                return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"the server does not answer /health: {exc}")
        return 1
    relay_target = s3_relay_target()
    if relay_target:
        try:
            socket.create_connection(("127.0.0.1", relay_target[0]), timeout=2).close()
        except OSError:
            print("the S3 relay does not accept connections")
            return 1
    problem = database_answers(timeout=2)
    if problem:
        print(problem)
        return 1
    return 0


GC_LAST_GOOD = Path("/tmp/gc-last-good")


def _gc_args(args: list[str]) -> tuple[float, bool]:
    import argparse

    parser = argparse.ArgumentParser(prog="gc", description="Remove what was deleted long enough ago.")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")
    parser.add_argument("--older-than", type=float, metavar="DAYS",
                        help="days since deletion (default: GC_OLDER_THAN_DAYS); 0 takes everything deleted")
    parsed = parser.parse_args(args)
    days = setting_float("GC_OLDER_THAN_DAYS") if parsed.older_than is None else parsed.older_than
    if days < 0:
        raise ConfigError("--older-than must be 0 or more days")
    return days, parsed.dry_run


def setting_float(key: str) -> float:
    return float(setting(key))


def cmd_gc(args: list[str]) -> int:
    import maintenance

    days, dry_run = _gc_args(args)
    maintenance.collect(days, dry_run)
    return 0


def cmd_gc_schedule(_args: list[str]) -> int:
    """Collect now, then every GC_INTERVAL_HOURS; healthy unless two intervals pass
    without a good run (a first collection that waits for a backup, or has a long
    backlog, is not a failure: the start counts as the reference)."""
    import maintenance

    days, interval = setting_float("GC_OLDER_THAN_DAYS"), setting_float("GC_INTERVAL_HOURS") * 3600
    if os.environ.get("STACK_WAIT_FOR_SCHEMA") == "true":
        wait_for_schema()
    print(f"gc: scheduled every {interval / 3600:g} h, for what was deleted more than {days:g} days ago",
          flush=True)
    GC_LAST_GOOD.write_text(f"{time.time():.0f} started\n")
    while True:
        try:
            maintenance.collect(days, dry_run=False)
            GC_LAST_GOOD.write_text(f"{time.time():.0f} collected\n")
            time.sleep(interval)
        except Exception as exc:  # noqa: BLE001 - keep the loop alive; the healthcheck shows it
            print(f"gc: failed: {exc}; retrying in 10 minutes", file=sys.stderr, flush=True)
            time.sleep(600)


def cmd_gc_health(_args: list[str]) -> int:
    try:
        stamp, state = GC_LAST_GOOD.read_text().split()[:2]
        age = time.time() - float(stamp)
    except (OSError, ValueError):
        print("the scheduler has not started")
        return 1
    if state == "started":
        print(f"started {age / 3600:.1f} h ago, first collection not finished yet")
    else:
        print(f"last good garbage collection {age / 3600:.1f} h ago")
    return 1 if common.overdue(age, setting_float("GC_INTERVAL_HOURS")) else 0


COMMANDS = {
    "drop-unreadable-gateway-secrets": cmd_drop_unreadable_gateway_secrets,
    "gc": cmd_gc,
    "gc-schedule": cmd_gc_schedule,
    "gc-health": cmd_gc_health,
    "server": cmd_server,
    "serve-then-drain": cmd_serve_then_drain,
    "migrate": cmd_migrate,
    "init-bucket": cmd_init_bucket,
    "schema-status": cmd_schema_status,
    "check-stores": cmd_check_stores,
    "healthcheck": cmd_healthcheck,
    "forward": cmd_forward,
    "metrics": cmd_metrics,
    "nginx-metrics": cmd_nginx_metrics,
    "nginx-metrics-health": cmd_nginx_metrics_health,
}


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else "server"
    if name not in COMMANDS:
        # Anything else runs as given (e.g. `mlflow --version`, a shell).
        os.execvp(argv[1], argv[1:])
    try:
        return COMMANDS[name](argv[2:])
    except ConfigError as exc:
        print(f"entrypoint {name}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
