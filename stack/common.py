"""What the host scripts and the images both need, written once.

Standard library only (boto3 is imported when an S3 client is asked for), so
that the MLflow image and the backup image can carry this file as it is: their
Dockerfiles copy it from here (build context: the project's root), and there
is no other copy.

  secret(NAME)        NAME from the file named by NAME_FILE (Docker secrets), else NAME
  host_port(...)      host[:port] as a client writes it
  postgres_params()   connection settings of the stack's database
  external_s3()       the object store's URL when it is not the stack's own
  s3_client(...)      boto3 client for the stack's object store
  write_ca_bundle()   the system CAs plus one more, for clients that take one bundle
  maintenance_lock()  held by a backup or a garbage collection, so they never overlap
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Mapping, Optional

# Where Debian/Ubuntu, Fedora/RHEL and macOS/Alpine keep the system CAs.
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and what to do."""


def _environ(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def env(name: str, default: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    value = _environ(environ).get(name, default)
    if value is None or value == "":
        raise ConfigError(f"{name} is not set: set it in .env (see .env.example)")
    return value


def secret(name: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """NAME from the file named by NAME_FILE (Docker secrets), else NAME itself."""
    path = _environ(environ).get(f"{name}_FILE")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{name}_FILE={path} is empty")
        return value
    return env(name, environ=environ)


def host_port(host: str, port: int | str, scheme: str = "https") -> str:
    """host[:port] as a client writes it: IPv6 literals get brackets, the scheme's default port is dropped."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return host if int(port) == default else f"{host}:{port}"


# The roles the long-running services log in as on the stack's own PostgreSQL,
# instead of POSTGRES_USER (its superuser): the server and gc may read and write
# MLflow's rows, the exporter may read the statistics. The migrate job makes them
# (mlflow/entrypoint.py, ensure_roles). With POSTGRES_HOST the services log in as
# POSTGRES_USER (what that server's owner gave the stack).
SERVER_ROLE = "stack_server"
MONITOR_ROLE = "stack_monitor"


def postgres_params(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """How to log in: as the service's own role (POSTGRES_ROLE, password in
    POSTGRES_ROLE_PASSWORD_FILE) when it has one, else as POSTGRES_USER."""
    role = _environ(environ).get("POSTGRES_ROLE")
    return {
        "host": env("POSTGRES_HOST", "db", environ),
        "port": env("POSTGRES_PORT", str(port("db")), environ),
        "user": role or env("POSTGRES_USER", environ=environ),
        "password": secret("POSTGRES_ROLE_PASSWORD" if role else "POSTGRES_PASSWORD", environ),
        "dbname": env("POSTGRES_DB", environ=environ),
    }


def database_uri(environ: Optional[Mapping[str, str]] = None, dbname: Optional[str] = None) -> str:
    """psycopg2 driver URI; every part is URL-quoted, so any password character is safe."""
    p = postgres_params(environ)
    quote = lambda part: urllib.parse.quote(part, safe="")  # noqa: E731
    return (f"postgresql+psycopg2://{quote(p['user'])}:{quote(p['password'])}@{p['host']}:{p['port']}/"
            f"{quote(dbname or p['dbname'])}")


def auth_database(environ: Optional[Mapping[str, str]] = None) -> str:
    """The basic-auth user store: its own database beside MLflow's, in the same server."""
    return env("POSTGRES_DB", environ=environ) + "_auth"


def external_s3(environ: Optional[Mapping[str, str]] = None) -> str:
    """S3_ENDPOINT_URL: the store outside the stack that keeps the artifacts, or "" (the stack's minio)."""
    return _environ(environ).get("S3_ENDPOINT_URL", "").rstrip("/")


def s3_client(environ: Optional[Mapping[str, str]] = None, endpoint: Optional[str] = None, attempts: int = 5):
    """The stack's object store, by default straight on the backend network.

    Path-style addressing and checksums only when required: S3-compatible
    stores (MinIO, SeaweedFS, ...) differ from AWS in both.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint or env("S3_INTERNAL_ENDPOINT", OWN_S3_ENDPOINT, environ),
        aws_access_key_id=secret("AWS_ACCESS_KEY_ID", environ),
        aws_secret_access_key=secret("AWS_SECRET_ACCESS_KEY", environ),
        region_name=env("S3_REGION", "us-east-1", environ),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts, "mode": "standard"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def system_ca_bundle() -> Optional[Path]:
    return next((Path(p) for p in SYSTEM_CA_BUNDLES if Path(p).is_file()), None)


def stack_version() -> str:
    """This release of the stack (VERSION, semantic; CHANGELOG.md says what each changed)."""
    return (Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()


def resolves_to_loopback(host: str) -> bool:
    """Whether a name or address (IPv6 in brackets or not) is this machine's loopback."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except socket.gaierror:
        return False
    return any(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def write_ca_bundle(extra: Path, dest: Path) -> Path:
    """dest = the system's CAs plus `extra` (requests and boto3 take one bundle).
    Written only when it would change, so re-runs change nothing."""
    system = system_ca_bundle()
    text = (system.read_text() if system else "").rstrip("\n") + "\n" + Path(extra).read_text()
    if not dest.exists() or dest.read_text() != text:
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, dest)
    return dest


# What prints the MLflow version inside an image of the server (`python3 -c`).
MLFLOW_VERSION_CODE = "import mlflow; print(mlflow.__version__)"

# Where in the bucket MLflow keeps artifacts (s3://BUCKET/artifacts/): nothing else of the stack's is there.
ARTIFACTS_PREFIX = "artifacts"

# The backup job's textfile metric in BACKUP_DIR (node-exporter reads it;
# alert BackupTooOld). Removed by a deploy that turns scheduled backups off.
BACKUP_METRICS_FILE = "mlflow-stack-backup.prom"

# --- Topology: where each service listens inside the stack's networks ----------
# One home for the internal ports and the MLflow image's user: Python reads them here;
# docker-compose.yml, monitoring/prometheus.yml and the Dockerfiles cannot import them,
# so tests/unit/test_topology.py checks that they name the same; docs/configuration.md
# shows them (generated, beside the settings table). None is published: only nginx is.
TOPOLOGY: dict[str, tuple[int, str]] = {
    # name: (port, what listens there)
    "mlflow": (5000, "the MLflow server (nginx's upstream, MLFLOW_INTERNAL_URL)"),
    "mlflow-metrics": (9101, "the server workers' Prometheus metrics (MLFLOW_METRICS_PORT; Prometheus only)"),
    "db": (5432, "PostgreSQL"),
    "minio": (9000, "the S3 store's API"),
    "pitr-metrics": (9102, "the point-in-time archive's metrics (PITR_METRICS_PORT)"),
    "prometheus": (9090, "Prometheus (profile monitoring; through nginx for admins)"),
    "alertmanager": (9093, "Alertmanager (profile monitoring)"),
    "nginx-exporter": (9113, "nginx's request metrics (profile monitoring)"),
    "nginx-exporter-syslog": (5140, "nginx's per-request lines, over syslog (UDP)"),
    "postgres-exporter": (9187, "PostgreSQL's metrics (profile monitoring)"),
    "node-exporter": (9100, "the volumes' free space, the backup job's metrics (profile monitoring)"),
}
# The MLflow image's user and group (mlflow/Dockerfile), which owns its tmpfs mounts.
IMAGE_UID = 10001


def port(name: str) -> int:
    return TOPOLOGY[name][0]


# The stack's own S3 store, as the services reach it.
OWN_S3_ENDPOINT = f"http://minio:{port('minio')}"


# nginx sends one line per request over syslog to the nginx-exporter service
# (profile monitoring, mlflow/nginx_metrics.py), which Prometheus scrapes.
NGINX_EXPORTER = "nginx-exporter"
NGINX_EXPORTER_SYSLOG_PORT = port("nginx-exporter-syslog")
NGINX_EXPORTER_METRICS_PORT = port("nginx-exporter")
NGINX_METRICS_TAG = "nginx_metrics"

# MinIO's error code (with a 507) for an object or part it has no room for: the
# server looks for it, and nginx's answer on the S3 port keeps it.
STORE_FULL_CODE = "XMinioStorageFull"
# What to do then. The server says it for uploads through it (mlflow/stack_guard.py),
# nginx for those to the S3 port (presigned parts, direct mode;
# STACK_STORE_FULL_MESSAGE): the store's own message does not know this stack.
STORE_FULL_ADVICE = ("Free space (./stack_gc.sh removes the artifacts of deleted runs) or grow the disk, "
                     "then log the artifact again.")
# nginx's, in an XML element in a single-quoted string of its config: no ' " $ \\ < > &.
STORE_FULL_MESSAGE = f"The artifact store is full ({STORE_FULL_CODE}). {STORE_FULL_ADVICE}"


def nginx_metrics_log(profiles: str) -> str:
    """nginx's access_log target for its request metrics. nginx resolves a
    syslog host once, at start, and refuses to start if the name is unknown:
    without the profile the lines go nowhere."""
    if "monitoring" not in profiles.split(","):
        return "/dev/null"
    return f"syslog:server={NGINX_EXPORTER}:{NGINX_EXPORTER_SYSLOG_PORT},nohostname,tag={NGINX_METRICS_TAG}"


# PostgreSQL advisory lock key ("mlfl"): a backup, a restore and a garbage
# collection each hold it for their whole run, so gc never deletes within a
# running backup or restore.
MAINTENANCE_LOCK = 0x6D6C666C


@contextlib.contextmanager
def maintenance_lock(what: str, environ: Optional[Mapping[str, str]] = None, poll: float = 5.0):
    """Hold the maintenance lock while the block runs; wait (saying so) while another holds it.

    A session lock on a connection of its own: it ends with the block, or with the
    process if that dies, so a crashed job never leaves it behind."""
    import psycopg2

    # On the maintenance database, not MLflow's: a restore drops and re-creates that
    # one (dropdb --force would cut the lock's connection).
    conn = psycopg2.connect(**{**postgres_params(environ), "dbname": "postgres"})
    conn.autocommit = True
    try:
        waited = 0.0
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK,))
                if cur.fetchone()[0]:
                    break
                if waited % 60 < poll:
                    print(f"{what}: waiting for the running backup, restore or garbage collection to finish",
                          file=sys.stderr, flush=True)
                time.sleep(poll)
                waited += poll
        yield
    finally:
        conn.close()


def overdue(age_seconds: float, interval_hours: float) -> bool:
    """A scheduled job's health: its last good run is older than two intervals (and 10 minutes)."""
    return age_seconds > 2 * interval_hours * 3600 + 600
