#!/usr/bin/env python3
"""Shared entrypoint of the MLflow image (pip and conda variants).

Subcommands:
  server        run the tracking server (the default)
  migrate       bring the database schema up to date (`mlflow db upgrade`), then exit
  init-bucket   create the artifact bucket if it is missing, then exit
  schema-status print "empty", "current", "outdated DB HEAD" or "newer DB HEAD" (exit 0)
  healthcheck   exit 0 when the server answers /health (and the S3 relay, if any, accepts)
  forward       internal: relay a loopback port to another host (see s3_relay_target)

Secrets arrive as files (`*_FILE`, Docker secrets) and are only ever put into
this process's environment, never on a command line, so that neither
`docker inspect` nor `docker top` shows them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SERVER_PORT = 5000
STACK_HOME = "/opt/mlflow"


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and what to do."""


def env(name: str, default: str | None = None, environ=None) -> str:
    environ = os.environ if environ is None else environ
    value = environ.get(name, default)
    if value is None or value == "":
        raise ConfigError(f"{name} is not set: set it in .env (see .env.example)")
    return value


def secret(name: str, environ=None) -> str:
    """NAME from the file named by NAME_FILE (Docker secrets), else NAME itself."""
    environ = os.environ if environ is None else environ
    path = environ.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{name}_FILE={path} is empty")
        return value
    return env(name, environ=environ)


def database_uri(environ=None) -> str:
    """psycopg2 driver URI; the password is URL-quoted so any character is safe."""
    user = urllib.parse.quote(env("POSTGRES_USER", environ=environ), safe="")
    password = urllib.parse.quote(secret("POSTGRES_PASSWORD", environ=environ), safe="")
    host = env("POSTGRES_HOST", "db", environ=environ)
    port = env("POSTGRES_PORT", "5432", environ=environ)
    db = urllib.parse.quote(env("POSTGRES_DB", environ=environ), safe="")
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{db}"


def public_origin(environ=None) -> tuple[str, str, int]:
    scheme = env("MLFLOW_PUBLIC_SCHEME", "https", environ=environ)
    host = env("MLFLOW_PUBLIC_HOST", environ=environ)
    port = int(env("MLFLOW_PUBLIC_PORT", environ=environ))
    return scheme, host, port


def auth_enabled(environ=None) -> bool:
    value = env("MLFLOW_AUTH", "true", environ=environ)
    if value not in ("true", "false"):
        raise ConfigError(f"MLFLOW_AUTH={value!r}: use true or false")
    return value == "true"


def auth_database_uri(environ=None) -> str:
    """The user store: its own database next to MLflow's, in the same server."""
    base, _, db = database_uri(environ).rpartition("/")
    return f"{base}/{db}_auth"


def host_port(host: str, port: int, scheme: str) -> str:
    """host[:port] as a client writes it; IPv6 literals get brackets, default ports are dropped."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return host if port == default else f"{host}:{port}"


def s3_endpoint(environ=None) -> str:
    """The S3 endpoint as clients outside see it (nginx's S3 port).

    MLflow signs presigned URLs for this endpoint, so it must be the public
    one: a client follows the URL as given, and SigV4 signs the Host header.
    """
    scheme, host, _ = public_origin(environ)
    return f"{scheme}://{host_port(host, int(env('S3_PORT', environ=environ)), scheme)}"


def allowed_hosts(environ=None) -> str:
    scheme, host, port = public_origin(environ)
    hosts = [host_port(host, port, scheme), host]
    if is_loopback(host.strip("[]")):
        # On the stack's own machine, any loopback spelling reaches nginx.
        hosts += [host_port(h, port, scheme) for h in ("localhost", "127.0.0.1", "::1")]
    # The healthcheck and in-network callers use the server's own address.
    hosts += [f"localhost:{SERVER_PORT}", f"127.0.0.1:{SERVER_PORT}", f"mlflow:{SERVER_PORT}"]
    return ",".join(dict.fromkeys(hosts))


def cors_origins(environ=None) -> str:
    scheme, host, port = public_origin(environ)
    return f"{scheme}://{host_port(host, port, scheme)}"


def artifact_args(environ=None) -> list[str]:
    bucket = env("MLFLOW_BUCKET", environ=environ)
    mode = env("MLFLOW_ARTIFACTS_MODE", "proxied", environ=environ)
    root = f"s3://{bucket}/artifacts"
    if mode == "proxied":
        return ["--serve-artifacts", "--artifacts-destination", root]
    if mode == "direct":
        return ["--no-serve-artifacts", "--default-artifact-root", root]
    raise ConfigError(f"MLFLOW_ARTIFACTS_MODE={mode!r}: use 'proxied' or 'direct'")


def server_argv(environ=None) -> list[str]:
    workers = env("MLFLOW_WORKERS", "2", environ=environ)
    if not workers.isdigit() or int(workers) < 1:
        raise ConfigError(f"MLFLOW_WORKERS={workers!r}: use a whole number >= 1")
    return [
        "mlflow", "server",
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--workers", workers,
        # The stack's app: MLflow (with basic-auth when on) behind input checks.
        "--app-name", "stack",
        *artifact_args(environ),
    ]


def s3_environment(environ=None) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": secret("AWS_ACCESS_KEY_ID", environ=environ),
        "AWS_SECRET_ACCESS_KEY": secret("AWS_SECRET_ACCESS_KEY", environ=environ),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(environ),
    }


def server_environment(environ=None, runtime_dir: str = "/tmp/mlflow-stack") -> dict[str, str]:
    result = {
        **s3_environment(environ),
        "MLFLOW_BACKEND_STORE_URI": database_uri(environ),
        "MLFLOW_SERVER_ALLOWED_HOSTS": allowed_hosts(environ),
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": cors_origins(environ),
        "MLFLOW_STACK_AUTH": "true" if auth_enabled(environ) else "false",
    }
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    trust = (environ or os.environ).get("STACK_TLS_TRUST", "")
    if trust and os.path.isfile(trust):
        # The server's own S3 calls go to the public (TLS) endpoint: trust the
        # stack's certificate on top of the usual CAs.
        import certifi

        bundle = os.path.join(runtime_dir, "ca-bundle.pem")
        with open(certifi.where(), encoding="utf-8") as system, open(trust, encoding="utf-8") as extra, \
                open(bundle, "w", encoding="utf-8") as out:
            out.write(system.read().rstrip("\n") + "\n" + extra.read())
        result["AWS_CA_BUNDLE"] = bundle
    if auth_enabled(environ):
        permission = env("MLFLOW_DEFAULT_PERMISSION", "READ", environ=environ)
        cache = env("MLFLOW_AUTH_CACHE_SECONDS", "30", environ=environ)
        if not cache.isdigit():
            raise ConfigError(f"MLFLOW_AUTH_CACHE_SECONDS={cache!r}: use a whole number of seconds")
        ini = os.path.join(runtime_dir, "basic_auth.ini")
        fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("[mlflow]\n"
                     f"default_permission = {permission}\n"
                     f"database_uri = {auth_database_uri(environ).replace('%', '%%')}\n"
                     f"admin_username = {env('MLFLOW_ADMIN_USERNAME', 'admin', environ=environ)}\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     f"auth_cache_ttl_seconds = {cache}\n"
                     "auth_cache_max_size = 10000\n")
        result.update({
            "MLFLOW_AUTH_CONFIG_PATH": ini,
            "MLFLOW_AUTH_ADMIN_USERNAME": env("MLFLOW_ADMIN_USERNAME", "admin", environ=environ),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret("MLFLOW_ADMIN_PASSWORD", environ=environ),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret("MLFLOW_FLASK_SECRET_KEY", environ=environ),
        })
    return result


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return any(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def s3_relay_target(environ=None) -> tuple[int, str, int] | None:
    """(local port, target host, target port) when the public S3 host is loopback here.

    A client on the host reaches nginx at localhost:S3_PORT; inside this
    container localhost is the container itself, so the same URL would miss
    nginx. A relay on that loopback port to nginx keeps one URL valid for
    both, Host header included. A real host name needs no relay: compose
    gives nginx that name as a network alias.
    """
    _, host, _ = public_origin(environ)
    if not is_loopback(host.strip("[]")):
        return None
    port = int(env("S3_PORT", environ=environ))
    return port, env("S3_RELAY_HOST", "nginx", environ=environ), port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _relay(listen_port: int, target_host: str, target_port: int) -> None:
    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        for w in (client_w, up_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def cmd_forward(args: list[str]) -> int:
    listen_port, target_host, target_port = int(args[0]), args[1], int(args[2])
    asyncio.run(_relay(listen_port, target_host, target_port))
    return 0


def cmd_server(_args: list[str]) -> int:
    os.environ.update(server_environment())
    if auth_enabled():
        # What `mlflow server --app-name basic-auth` does before starting
        # workers (MLflow >= 3.17); with the stack's own app name it is done
        # here, once. Older releases create the admin in each worker instead.
        try:
            from mlflow.server import _bootstrap_basic_auth
        except ImportError:
            _bootstrap_basic_auth = None
        if _bootstrap_basic_auth is not None:
            _bootstrap_basic_auth()
    else:
        print("entrypoint: WARNING: authentication is OFF (MLFLOW_AUTH=false); anyone who can "
              "reach the server can read and change everything", file=sys.stderr, flush=True)
    relay = s3_relay_target()
    if relay:
        subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, __file__, "forward", *map(str, relay)], close_fds=True
        )
    argv = server_argv()
    print(f"entrypoint: starting {' '.join(argv)}", flush=True)
    os.execvp(argv[0], argv)
    return 1  # not reached


def cmd_migrate(_args: list[str]) -> int:
    from mlflow.db import upgrade

    # `mlflow db upgrade URI`, called in-process so that the URI (with its
    # password) never appears on a command line. It creates the tables on an
    # empty database and is a no-op on a current one.
    print("migrate: bringing the MLflow schema up to date", flush=True)
    upgrade.callback(database_uri())
    print("migrate: schema is current", flush=True)
    if auth_enabled():
        ensure_auth_database()
    return 0


def ensure_auth_database() -> None:
    """Create the user store's database and schema before any server worker starts
    (workers migrating it concurrently would race)."""
    import psycopg2
    from psycopg2 import sql

    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    name = env("POSTGRES_DB") + "_auth"
    conn = psycopg2.connect(host=env("POSTGRES_HOST", "db"), port=env("POSTGRES_PORT", "5432"),
                            user=env("POSTGRES_USER"), password=secret("POSTGRES_PASSWORD"),
                            dbname=env("POSTGRES_DB"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"migrate: created the user database {name}", flush=True)
    finally:
        conn.close()
    SqlAlchemyStore().init_db(auth_database_uri())
    print(f"migrate: user database {name} is current", flush=True)


def cmd_schema_status(_args: list[str]) -> int:
    """How the database schema compares with this image's MLflow (for upgrades)."""
    from alembic.script import ScriptDirectory

    from mlflow.store.db.utils import (
        _get_alembic_config,
        _get_schema_version,
        _is_empty_database,
        create_sqlalchemy_engine_with_retry,
    )

    uri = database_uri()
    engine = create_sqlalchemy_engine_with_retry(uri)
    head = ScriptDirectory.from_config(_get_alembic_config(uri)).get_current_head()
    if _is_empty_database(engine):
        print("empty", head)
        return 0
    current = _get_schema_version(engine)
    if current == head:
        print("current", current)
        return 0
    try:
        known = ScriptDirectory.from_config(_get_alembic_config(uri)).get_revision(current) is not None
    except Exception:  # noqa: BLE001 - alembic raises several types for unknown revisions
        known = False
    print("outdated" if known else "newer", current, head)
    return 0


def s3_client():
    """The store, straight on the backend network (for the bucket job and
    ./show_all.sh; the server itself uses the public endpoint, see s3_endpoint)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env("S3_INTERNAL_ENDPOINT", "http://minio:9000"),
        aws_access_key_id=secret("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=secret("AWS_SECRET_ACCESS_KEY"),
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 3, "mode": "standard"},
                      s3={"addressing_style": "path"}),
    )


def cmd_init_bucket(_args: list[str]) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = env("MLFLOW_BUCKET")
    client = s3_client()
    for _ in range(60):
        try:
            client.head_bucket(Bucket=bucket)
            print(f"init-bucket: bucket {bucket!r} already exists", flush=True)
            return 0
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                client.create_bucket(Bucket=bucket)
                print(f"init-bucket: created bucket {bucket!r}", flush=True)
                return 0
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                print(f"init-bucket: the object store refused the credentials ({code});"
                      " MINIO_ROOT_USER/MINIO_ROOT_PASSWORD in .env must match the ones the"
                      " minio volume was created with", file=sys.stderr)
                return 1
            print(f"init-bucket: {code}, retrying", flush=True)
        except BotoCoreError as exc:
            print(f"init-bucket: object store not reachable yet ({type(exc).__name__})",
                  flush=True)
        time.sleep(2)
    print("init-bucket: gave up after 120 s; check the minio service", file=sys.stderr)
    return 1


def cmd_healthcheck(_args: list[str]) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{SERVER_PORT}/health", timeout=5) as r:
            if r.status != 200:
                return 1
    except (urllib.error.URLError, OSError):
        return 1
    relay = s3_relay_target()
    if relay:
        try:
            socket.create_connection(("127.0.0.1", relay[0]), timeout=5).close()
        except OSError:
            return 1
    return 0


COMMANDS = {
    "server": cmd_server,
    "migrate": cmd_migrate,
    "init-bucket": cmd_init_bucket,
    "schema-status": cmd_schema_status,
    "healthcheck": cmd_healthcheck,
    "forward": cmd_forward,
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
