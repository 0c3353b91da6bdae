"""The one home of the stack's settings: every .env key, its default, its rule,
whether it is a secret, and which services read it.

From this table come: `.env` creation and validation (stack/envfile.py), the
secret files (stack/secretfiles.py), `.env.example` and the configuration
reference's table, docs/configuration.md (`python3 -m stack.settings write`; a
unit test fails when either has drifted), and the checks the MLflow image's entrypoint makes on the
values it reads. The images carry a copy of this file (it needs only the
standard library), so a rule exists once.

Adding a key: one `Setting(...)` below, plus its consumer (a `${KEY:?}` line
in docker-compose.yml, or the Python that reads it). Then run
`python3 -m stack.settings write`.
"""

from __future__ import annotations

import ipaddress
import re
import secrets as _secrets
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

GENERATED = "<generated>"
# Generated secrets are 32 characters; one chosen by hand must have at least this many.
MIN_SECRET_LENGTH = 16


class SettingError(ValueError):
    """A value breaks its key's rule; the message says what to use instead."""


# --- Rules: each checks one value and says what to use instead -------------

@dataclass(frozen=True)
class Rule:
    check: Callable[[str], bool]
    advice: str
    # Other valid values (the drift tests use the first that differs from the default).
    others: tuple[str, ...]

    def other_than(self, value: str) -> str:
        return next(o for o in self.others if o != value)

    def __call__(self, key: str, value: str) -> None:
        if not self.check(value):
            raise SettingError(f"{key}={value!r}: {self.advice}")


def _is_int(value: str, low: int, high: int) -> bool:
    return value.isdigit() and low <= int(value) <= high


def port() -> Rule:
    return Rule(lambda v: _is_int(v, 1, 65535), "use a port number between 1 and 65535", ("40123",))


def integer(low: int, high: int, unit: str = "") -> Rule:
    what = f"a whole number{' of ' + unit if unit else ''} from {low} to {high}"
    return Rule(lambda v: _is_int(v, low, high), f"use {what}", (str(min(high, low + 3)), str(high)))


def positive_number(unit: str) -> Rule:
    return Rule(lambda v: bool(re.fullmatch(r"\d+(\.\d+)?", v)) and float(v) > 0,
                f"use a positive number of {unit}", ("0.5", "2"))


PROFILES = ("backup", "gc", "monitoring")

# The login throttle (mlflow/stack_logins.py): a client address may fail this many times
# as often as an account; an address that logged in to the account in the last
# LOGIN_KNOWN_DAYS may mistype this many times as often, and is not held by the account's.
LOGIN_ADDRESS_FACTOR = 10
LOGIN_KNOWN_FACTOR = 4
LOGIN_KNOWN_DAYS = 30
# Access tokens (mlflow/stack_tokens.py, ./stack_users.sh token): how long one lives
# unless its maker says otherwise, and at most.
TOKEN_DEFAULT_DAYS = 90
TOKEN_MAX_DAYS = 365

# Each of a server worker's three stores (tracking, model registry, basic-auth
# users) keeps up to POOL_SIZE connections open, and opens MAX_OVERFLOW more on
# demand, each closed after one use. SQLAlchemy's default (5 kept, 10 more) made
# a new PostgreSQL connection (a process and a SCRAM login) for one request in 7
# at 16 client threads (measured). MLflow drops a MAX_OVERFLOW of 0 (`if value:`)
# and SQLAlchemy then allows 10 more: hence 1.
POOL_SIZE = 14
MAX_OVERFLOW = 1
CONNECTIONS_PER_WORKER = 3 * (POOL_SIZE + MAX_OVERFLOW)
# What the one-shot jobs, backups, gc and the exporters may hold besides.
CONNECTIONS_OTHERS = 20


def profiles() -> Rule:
    """A comma-separated choice of the optional services' Compose profiles."""
    def check(value: str) -> bool:
        names = value.split(",")
        return value == "" or (len(set(names)) == len(names) and set(names) <= set(PROFILES))

    return Rule(check, f"use a comma-separated choice of {', '.join(PROFILES)} (or nothing)",
                (",".join(PROFILES), *PROFILES))


def choice(*allowed: str) -> Rule:
    return Rule(lambda v: v in allowed, f"use {' or '.join(allowed)}", allowed)


def pattern(regex: str, advice: str, other: str) -> Rule:
    compiled = re.compile(regex)
    return Rule(lambda v: bool(compiled.fullmatch(v)), advice, (other,))


_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def host() -> Rule:
    return Rule(lambda v: _is_ip(v.strip("[]")) or bool(_HOSTNAME.fullmatch(v)),
                "use a host name (mlflow.example.com) or an IP address, without scheme or port",
                ("mlflow.example.org",))


def url() -> Rule:
    def check(value: str) -> bool:
        m = re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?", value)
        return bool(m) and (_is_ip(m.group(1).strip("[]")) if m.group(1).startswith("[") else
                            bool(_HOSTNAME.fullmatch(m.group(1)))) and (not m.group(2) or 0 < int(m.group(2)) < 65536)

    return Rule(check,
                "use the store's endpoint as an http(s) URL without a path, such as "
                "https://s3.eu-central-1.amazonaws.com or http://10.0.0.5:9000", ("https://s3.example.com",))


def ipv4_or_host_name() -> Rule:
    def check(value: str) -> bool:
        try:
            return ipaddress.ip_address(value).version == 4
        except ValueError:
            return bool(_HOSTNAME.fullmatch(value))

    return Rule(check, "use a host name (pg.example.com) or an IPv4 address, without scheme or port "
                "(for an IPv6-only server, give it a DNS name)", ("pg.example.org",))


def ip_address() -> Rule:
    return Rule(_is_ip, "use an IP address (0.0.0.0 or 127.0.0.1)", ("127.0.0.1", "0.0.0.0"))


def secret() -> Rule:
    return Rule(lambda v: v != GENERATED and len(v) >= MIN_SECRET_LENGTH,
                f"use at least {MIN_SECRET_LENGTH} characters (delete the line and run "
                "./stack_deploy.sh to generate one)", ("x" * 32,))


def token() -> Rule:
    """A generated secret that goes into nginx's configuration or an HTTP header as it is."""
    return Rule(lambda v: v != GENERATED and len(v) >= MIN_SECRET_LENGTH and bool(re.fullmatch(r"[A-Za-z0-9_-]+", v)),
                f"use at least {MIN_SECRET_LENGTH} letters, digits, _ or - (delete the line and run "
                "./stack_deploy.sh to generate one)", ("x" * 32,))


def memory() -> Rule:
    return Rule(lambda v: bool(re.fullmatch(r"[1-9]\d*(\.\d+)?[kmg]", v)),
                "use a size such as 512m or 2g", ("3g", "5g"))


_EMAIL = r"[^@\s,]+@[A-Za-z0-9.-]+"


def emails() -> Rule:
    return Rule(lambda v: bool(re.fullmatch(rf"{_EMAIL}(\s*,\s*{_EMAIL})*", v)),
                "use an e-mail address, or several separated by commas", ("ops@example.org",))


def email() -> Rule:
    return Rule(lambda v: bool(re.fullmatch(_EMAIL, v)), "use one e-mail address", ("mlflow@example.org",))


def host_and_port() -> Rule:
    return Rule(lambda v: bool(re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", v))
                and 0 < int(v.rsplit(":", 1)[1]) < 65536,
                "use the mail server as host:port, such as smtp.example.com:587", ("smtp.example.org:587",))


def webhook() -> Rule:
    return Rule(lambda v: bool(re.fullmatch(r"https?://[^\s/]+(/\S*)?", v)),
                "use an http(s) URL, such as https://chat.example.com/hooks/abc", ("https://hooks.example.org/x",))


def anything(other: str) -> Rule:
    return Rule(lambda v: True, "", (other,))


# --- The table -----------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    rule: Rule
    doc: str
    section: str
    # Compose services that read it (the drift test checks the compose file against this).
    services: tuple[str, ...] = ()
    # Host-side readers, for the configuration reference (not checked: they import this table).
    host: tuple[str, ...] = ()
    # Rendered into a file under /run/secrets with this name.
    file: Optional[str] = None
    may_be_empty: bool = False
    # A secret the user brings (a password of another system): never printed or exported,
    # like the generated ones; it reaches the services as a file only.
    secret: bool = False
    # False: only .env sets it; a variable of the same name in the shell is ignored
    # (a stray `export POSTGRES_HOST=...` must not point a restore at another server).
    from_shell: bool = True

    @property
    def generated(self) -> bool:
        return self.default == GENERATED

    @property
    def sensitive(self) -> bool:
        """Never printed, logged or exported to the shell."""
        return self.generated or self.secret


CLIENTS = "How clients reach the stack"
AUTH = "Authentication"
SERVER = "MLflow server"
STORES = "Stores"
LIMITS = "Limits"
BACKUPS = "Backups (see docs/backups.md)"
ALERTS = "Alert delivery (profile monitoring; see docs/monitoring.md)"

SETTINGS: tuple[Setting, ...] = (
    Setting("MLFLOW_PUBLIC_HOST", "localhost", host(), section=CLIENTS,
            services=("mlflow", "nginx", "migrate", "bucket-init", "backup"), host=("TLS certificate", "client settings"),
            doc="Host name clients use (a DNS name or an address of this machine). Presigned S3 URLs "
                "carry it, so it must be the same name everywhere; use a DNS name for a team server."),
    Setting("BIND_ADDRESS", "0.0.0.0", ip_address(), section=CLIENTS, services=("nginx",), host=("preflight",),
            doc="Address the published ports bind to: 0.0.0.0 for every interface, 127.0.0.1 for this "
                "machine only."),
    Setting("HTTPS_PORT", "8443", port(), section=CLIENTS,
            services=("mlflow", "nginx", "migrate", "bucket-init", "backup"), host=("preflight", "client settings"),
            doc="Port of the MLflow UI and API over HTTPS (nginx)."),
    Setting("HTTP_PORT", "8080", port(), section=CLIENTS, services=("nginx",), host=("preflight",),
            doc="Plain HTTP port: it only redirects to HTTPS_PORT."),
    Setting("S3_PORT", "9000", port(), section=CLIENTS,
            services=("mlflow", "nginx", "migrate", "bucket-init", "backup"), host=("preflight", "client settings"),
            doc="Port of the artifact store's S3 API over HTTPS (nginx), used by presigned URLs."),
    Setting("MLFLOW_BASE_PATH", "",
            pattern(r"(/[A-Za-z0-9_~-]+)+", "use a path such as /mlflow: a leading /, no trailing /, "
                    "letters, digits and _ ~ -", "/mlflow"),
            section=CLIENTS, may_be_empty=True,
            services=("backup", "bucket-init", "migrate", "mlflow", "nginx", "prometheus"), host=("client settings", "show"),
            doc="Serve MLflow under this path (e.g. /mlflow, for https://tools.example.com/mlflow/) instead "
                "of at the root: UI, API and artifacts move there, and clients' MLFLOW_TRACKING_URI ends with "
                "it. Empty: at the root."),
    Setting("TLS_CERT_FILE", "", anything("/etc/ssl/mlflow.pem"), section=CLIENTS, may_be_empty=True,
            services=("mlflow", "nginx"),
            doc="Your certificate (full chain, PEM). Leave it and TLS_KEY_FILE empty and the first "
                "deploy makes a local CA and a certificate for MLFLOW_PUBLIC_HOST (certs/)."),
    Setting("TLS_KEY_FILE", "", anything("/etc/ssl/mlflow.key"), section=CLIENTS, may_be_empty=True,
            services=("mlflow", "nginx"), doc="The key of TLS_CERT_FILE."),
    Setting("TLS_CA_FILE", "", anything("/etc/ssl/company-root-ca.pem"), section=CLIENTS, may_be_empty=True,
            # With TLS_CERT_FILE only (alone it is refused): then the server's STACK_TLS_TRUST.
            host=("TLS certificate", "client settings", "users tool"),
            doc="The CA that issued TLS_CERT_FILE (PEM), when it is not one of the system's: your company's "
                "own root, say. The server trusts it for its calls to the public endpoints, and the client "
                "settings name it (certs/ca-bundle.pem: the system CAs plus it). The deploy checks that the "
                "certificate verifies against it (or the system CAs) for MLFLOW_PUBLIC_HOST."),

    Setting("MLFLOW_AUTH", "true", choice("true", "false"), section=AUTH,
            services=("mlflow", "migrate", "bucket-init", "backup"), host=("client settings", "users tool"),
            doc="true: every request needs a login (MLflow basic-auth). false only for a purely local "
                "setup: then anyone who reaches the ports can read and change everything (the deploy warns)."),
    Setting("MLFLOW_ADMIN_USERNAME", "admin",
            pattern(r"[A-Za-z0-9_.@-]{1,64}", "use letters, digits and _ . @ - (at most 64)", "root-admin"),
            section=AUTH, services=("mlflow",), host=("client settings", "users tool"),
            doc="The admin account, created at the first start."),
    Setting("MLFLOW_ADMIN_PASSWORD", GENERATED, secret(), section=AUTH, services=("mlflow",),
            file="mlflow_admin_password", host=("client settings", "users tool"),
            doc="The admin's password. Changing it here later does not change the account: use "
                "./stack_users.sh passwd admin, then put the new one here."),
    Setting("MLFLOW_FLASK_SECRET_KEY", GENERATED, secret(), section=AUTH, services=("mlflow",),
            file="mlflow_flask_secret_key", doc="Signs the UI's sessions."),
    Setting("MLFLOW_CRYPTO_KEK_PASSPHRASE", GENERATED, secret(), section=AUTH, services=("mlflow", "migrate"),
            file="mlflow_crypto_kek_passphrase",
            doc="Encrypts the secrets (LLM provider keys) that MLflow's AI gateway stores in the database; "
                "unset, MLflow would use a built-in passphrase that is the same in every installation. "
                "Restoring a backup into another installation: copy this value there first. Changing it "
                "makes stored gateway secrets unreadable (the deploy refuses and says so)."),
    Setting("STACK_NGINX_TOKEN", GENERATED, token(), section=AUTH, services=("mlflow", "nginx"),
            file="stack_nginx_token",
            doc="nginx sends it with every request it passes to the server; the server answers no one "
                "else (other containers on the stack's networks, the host by a container's address)."),
    Setting("STACK_METRICS_TOKEN", GENERATED, token(), section=AUTH, services=("mlflow", "prometheus"),
            file="stack_metrics_token",
            doc="Prometheus's bearer token for the server's internal metrics port; without it that port "
                "answers 401."),
    Setting("LOGIN_FREE_FAILURES", "5", integer(1, 100, "failed logins"), section=AUTH, services=("mlflow",),
            doc="Failed logins an account (or a login from one address) may have in an hour before each "
                "further failure holds it: 1 s, then twice as long each time, up to LOGIN_LOCK_MAX_SECONDS. "
                f"A client address may fail {LOGIN_ADDRESS_FACTOR} times as often over all accounts. A held login "
                "is answered 429 without its password being checked. An address that logged in to the account "
                f"in the last {LOGIN_KNOWN_DAYS} days is not held by other addresses' failures (and may mistype "
                f"{LOGIN_KNOWN_FACTOR} times as often), and logins the server already checked keep working."),
    Setting("LOGIN_LOCK_MAX_SECONDS", "300", integer(1, 86400, "seconds"), section=AUTH, services=("mlflow",),
            doc="The longest a login is held after failed logins (see LOGIN_FREE_FAILURES): with the "
                "defaults, a guesser gets 5 tries, then 9 more in about 4 minutes, then one every 5 minutes "
                "(under 300 a day)."),
    Setting("MLFLOW_DEFAULT_PERMISSION", "READ", choice("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"),
            section=AUTH, services=("mlflow",),
            doc="What users may do with experiments they did not create (they always MANAGE their own)."),
    Setting("MLFLOW_AUTH_CACHE_SECONDS", "30", integer(1, 3600, "seconds"), section=AUTH, services=("mlflow",),
            doc="Seconds a checked login is remembered per server worker. Checking a password costs "
                "~0.2 s of CPU (PBKDF2), which without the cache every API call would pay (hence at least 1); "
                "the price of caching: a changed or deleted login, or a changed admin flag, keeps working on "
                "other workers for up to this long."),

    Setting("MLFLOW_VARIANT", "pip", choice("pip", "conda"), section=SERVER, services=("bucket-init", "gc", "migrate", "mlflow", "nginx-exporter"),
            host=("deploy --variant",),
            doc="pip or conda image (the conda variant needs a reachable conda channel; --variant sets it)."),
    Setting("STACK_STANDINS", "false", choice("false", "true"), section=SERVER,
            host=("deploy --standins", "every script's Compose call"),
            doc="true: images that are neither on this machine nor pullable are replaced by offline "
                "stand-ins built here (tests/standin-images.sh), for trying the stack out and for "
                "tests, NOT for production. ./stack_deploy.sh --standins sets it."),
    Setting("STACK_REGISTRY", "", pattern(r"[A-Za-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)*", "use a registry address such as "
                                          "registry.example.com:5000 or registry.example.com/team", "127.0.0.1:5000"),
            section=SERVER, may_be_empty=True, host=("deploy --swarm",),
            doc="Swarm mode (./stack_deploy.sh --swarm): the registry every node pulls the images built here "
                "from; the deploy pushes them there. Needed once the swarm has more than one node."),
    Setting("MLFLOW_ARTIFACTS_MODE", "proxied", choice("proxied", "direct"), section=SERVER,
            services=("mlflow",), host=("client settings",),
            doc="proxied: clients send artifacts through the server (no S3 credentials needed). "
                "direct (the classic tutorial's scenario): clients write to S3 themselves and are given "
                "the store's credentials."),
    Setting("MLFLOW_REPLICAS", "2", integer(1, 16), section=SERVER, services=("mlflow",),
            doc="Tracking-server containers behind nginx. 2 or more (the default): a crashed one costs no "
                "client an error or a wait (nginx sends its requests to the others; with 1, clients wait "
                "about 20 s for the restart). Each has MLFLOW_WORKERS workers and "
                "MLFLOW_MEMORY_LIMIT of memory; together they must fit POSTGRES_MAX_CONNECTIONS (with "
                "POSTGRES_HOST: that server's max_connections, which the deploy warns about)."),
    Setting("MLFLOW_WORKERS", "2", integer(1, 64), section=SERVER, services=("mlflow",),
            doc="Server worker processes (per replica)."),
    Setting("MLFLOW_ENABLE_JOBS", "false", choice("true", "false"), section=SERVER, services=("mlflow",),
            doc="MLflow's job runner (async jobs); costs ~1.6 GiB of memory when on. Only with "
                "MLFLOW_REPLICAS=1 (set it too): each server keeps its own job queue and periodic tasks."),
    Setting("POSTGRES_MAX_CONNECTIONS", "250", integer(50, 5000), section=SERVER, services=("db",),
            doc=f"PostgreSQL's max_connections. Each server worker may hold up to {CONNECTIONS_PER_WORKER} (three "
                f"connection pools of {POOL_SIZE} kept open once opened, plus {MAX_OVERFLOW} on demand), and the jobs and exporters up to {CONNECTIONS_OTHERS} "
                "more: a deploy "
                "refuses MLFLOW_REPLICAS x MLFLOW_WORKERS that do not fit. The stack's own PostgreSQL only."),

    Setting("MLFLOW_BUCKET", "mlflow",
            pattern(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", "use 3-63 lower-case letters, digits, '.' or '-'",
                    "other-bucket"),
            section=STORES, services=("backup", "bucket-init", "gc", "migrate", "mlflow", "pitr"),
            doc="Artifact bucket; artifacts live under s3://BUCKET/artifacts/."),
    Setting("POSTGRES_USER", "mlflow",
            pattern(r"[a-z_][a-z0-9_]{0,62}", "use lower-case letters, digits and _ (start with a letter)",
                    "tracker"),
            section=STORES, services=("backup", "bucket-init", "db", "gc", "migrate", "mlflow", "pitr"),
            doc="Database role: PostgreSQL's superuser in the stack's own database. The server, gc and the "
                "exporter log in as roles of their own (POSTGRES_SERVER_PASSWORD, POSTGRES_MONITOR_PASSWORD)."),
    Setting("POSTGRES_DB", "mlflow",
            pattern(r"[a-z_][a-z0-9_]{0,62}", "use lower-case letters, digits and _ (start with a letter)",
                    "tracking"),
            section=STORES, services=("backup", "bucket-init", "db", "gc", "migrate", "mlflow", "pitr"),
            doc="Database name (the user store is the database POSTGRES_DB_auth beside it)."),
    Setting("POSTGRES_PASSWORD", GENERATED, secret(), section=STORES, file="postgres_password",
            services=("backup", "db", "migrate", "pitr"),
            doc="Database password. PostgreSQL keeps the one it was initialised with: changing it here "
                "later needs ALTER ROLE too. Only the jobs that change the schema or replace databases "
                "(migrate, backup and restore) log in with it."),
    Setting("POSTGRES_SERVER_PASSWORD", GENERATED, secret(), section=STORES, file="postgres_server_password",
            services=("gc", "migrate", "mlflow"),
            doc="Password of the role the server and gc log in as on the stack's PostgreSQL (stack_server: "
                "it may read and write MLflow's rows, not change the schema or read other databases). The "
                "migrate job sets it at each deploy. Unused with POSTGRES_HOST (then they log in as "
                "POSTGRES_USER)."),
    Setting("POSTGRES_MONITOR_PASSWORD", GENERATED, secret(), section=STORES, file="postgres_monitor_password",
            services=("migrate", "postgres-exporter"),
            doc="Password of the role the PostgreSQL exporter (profile monitoring) logs in as "
                "(stack_monitor: PostgreSQL's pg_monitor, statistics only)."),
    Setting("POSTGRES_HOST", "", ipv4_or_host_name(), section=STORES, may_be_empty=True, from_shell=False,
            services=("backup", "bucket-init", "gc", "migrate", "mlflow"),
            host=("deploy", "backup scripts", "show"),
            doc="Empty: the stack runs PostgreSQL itself (service db, volume db-data). A host name or IPv4 address: "
                "use that PostgreSQL server instead (e.g. a managed database), reached from the containers. It "
                "must have the role POSTGRES_USER with POSTGRES_PASSWORD, allowed to create databases (the "
                "first deploy makes POSTGRES_DB_auth, backups make a scratch database, a restore re-creates "
                "both), and own the database POSTGRES_DB. Read from .env only, never from the shell."),
    Setting("POSTGRES_PORT", "5432", port(), section=STORES, host=("deploy",), from_shell=False,
            doc="Port of POSTGRES_HOST (not used when the stack runs PostgreSQL itself). Read from .env only."),
    Setting("S3_ENDPOINT_URL", "", url(), section=STORES, may_be_empty=True, from_shell=False,
            services=("backup", "bucket-init", "db", "gc", "migrate", "mlflow", "nginx", "pitr"),
            host=("deploy", "backup scripts", "show", "client settings (direct mode)"),
            doc="Empty: the stack runs MinIO itself (service minio, volume minio-data), behind nginx's S3_PORT. "
                "A URL: keep artifacts in that S3 store instead (AWS S3 or any S3-compatible one), with "
                "MINIO_ROOT_USER and MINIO_ROOT_PASSWORD as its access key and secret key and the bucket "
                "MLFLOW_BUCKET (made if missing; a bucket of the stack's own: backups and restores take the "
                "whole bucket). Presigned URLs then name this endpoint, and S3_PORT serves nothing. Read from "
                ".env only, never from the shell."),
    Setting("S3_REGION", "us-east-1", pattern(r"[a-z0-9-]{2,32}", "use a region name such as eu-central-1",
                                              "eu-central-1"),
            section=STORES, services=("backup", "bucket-init", "db", "gc", "migrate", "mlflow", "pitr"),
            doc="Region the S3 requests are signed for (AWS: the bucket's region; MinIO ignores it)."),
    Setting("MINIO_ROOT_USER", "mlflow-admin",
            pattern(r"\S{3,128}", "use at least 3 characters, no spaces", "store-admin"),
            section=STORES, file="minio_root_user", services=("backup", "bucket-init", "gc", "migrate", "minio", "mlflow", "pitr"),
            host=("client settings (direct mode)", "db: the archive's keys, without PITR_S3_*"),
            doc="Object store access key (MinIO's root user, or the key of the store at S3_ENDPOINT_URL)."),
    Setting("MINIO_ROOT_PASSWORD", GENERATED, secret(), section=STORES, file="minio_root_password",
            services=("backup", "bucket-init", "gc", "migrate", "minio", "mlflow", "pitr"), host=("client settings (direct mode)", "db: the archive's keys, without PITR_S3_*"),
            doc="Object store secret key (of that user)."),

    Setting("MLFLOW_API_MAX_BODY_MB", "64", integer(2, 1024, "MiB"), section=LIMITS, services=("mlflow", "nginx"),
            doc="Largest API request body (not artifacts, which have no limit), enforced by nginx and by "
                "the server's input checks alike. MLflow's own log-batch limit is 1 MB."),
    Setting("API_RATE_PER_LOGIN", "500", integer(10, 100000, "requests a second"), section=LIMITS,
            services=("nginx",),
            doc="API and UI requests a second one login may send (bursts of a second's worth pass at once). Well "
                "above what a replica with 2 workers answers on 2 cores (220-260 a second for single metric calls): "
                "it stops a runaway script, not a busy training job. Artifact transfers are held to it too; "
                "password guessing is held long before it (LOGIN_FREE_FAILURES)."),
    Setting("API_RATE_PER_ADDRESS", "1000", integer(10, 100000, "requests a second"), section=LIMITS,
            services=("nginx",),
            doc="The same per client address, over all its logins and requests without one: a team behind "
                "one NAT address shares it. A backstop against made-up user names."),
    Setting("DB_MEMORY_LIMIT", "2g", memory(), section=LIMITS, services=("db",),
            doc="Memory ceiling of PostgreSQL (a limit, not a reservation)."),
    Setting("MINIO_MEMORY_LIMIT", "4g", memory(), section=LIMITS, services=("minio",),
            doc="Memory ceiling of the object store; 1 GiB objects need more than 1g."),
    Setting("MLFLOW_MEMORY_LIMIT", "4g", memory(), section=LIMITS, services=("mlflow",),
            doc="Memory ceiling of the MLflow server."),

    Setting("BACKUP_DIR", "./backups", anything("/srv/mlflow-backups"), section=BACKUPS, services=("backup", "node-exporter"),
            host=("backup scripts", "show"),
            doc="Folder for backup sets (relative to this project's folder, or absolute)."),
    Setting("COMPOSE_PROFILES", "", profiles(), section=BACKUPS, may_be_empty=True,
            services=("alertmanager", "backup", "gc", "nginx", "nginx-exporter", "prometheus", "postgres-exporter",
                      "node-exporter"),
            host=("deploy", "show"),
            doc="Optional services, comma-separated: backup (scheduled backups), gc (scheduled garbage "
                "collection), monitoring (Prometheus with alerts, at MLFLOW_BASE_PATH/prometheus/ for admins); "
                "e.g. backup,gc,monitoring. Empty: none."),
    Setting("BACKUP_INTERVAL_HOURS", "24", positive_number("hours"), section=BACKUPS, services=("backup",),
            host=("show",), doc="Hours between scheduled backups."),
    Setting("BACKUP_KEEP", "7", integer(1, 10000), section=BACKUPS, services=("backup",),
            doc="Scheduled backups kept (older ones are deleted)."),
    Setting("PITR_BUCKET", "mlflow-pitr",
            pattern(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", "use 3-63 lower-case letters, digits, '.' or '-'",
                    "other-pitr"),
            section=BACKUPS, services=("bucket-init", "db", "pitr"), host=("restore", "show"),
            doc="Bucket of the database's point-in-time archive (WAL and base backups), on the artifact "
                "store beside MLFLOW_BUCKET: not the artifact bucket, which logical restores replace. On "
                "the same disk it guards against mistakes, not against losing the machine."),
    Setting("PITR_S3_ENDPOINT_URL", "", url(), section=BACKUPS, may_be_empty=True, from_shell=False,
            services=("bucket-init", "db", "pitr"), host=("deploy", "restore"),
            doc="Empty: the point-in-time archive is on the stack's own object store (it guards against "
                "mistakes, not against losing the machine). A URL: keep it on that S3 store instead, off this "
                "machine (another site, a cloud bucket), with PITR_S3_ACCESS_KEY and PITR_S3_SECRET_KEY; "
                "then a lost machine costs at most PITR_ARCHIVE_SECONDS of writes (docs/backups.md). The deploy "
                "makes PITR_BUCKET there if it is missing, and stops with the reason if the store refuses. "
                "Read from .env only."),
    Setting("PITR_S3_ACCESS_KEY", "", anything("AKIAEXAMPLE"), section=BACKUPS, may_be_empty=True, from_shell=False,
            file="pitr_s3_access_key", host=("db, pitr and bucket-init, with PITR_S3_ENDPOINT_URL",),
            doc="Access key on PITR_S3_ENDPOINT_URL (one that may use PITR_BUCKET only, ideally)."),
    Setting("PITR_S3_SECRET_KEY", "", anything("x" * 40), section=BACKUPS, may_be_empty=True, from_shell=False,
            secret=True, file="pitr_s3_secret_key", host=("db, pitr and bucket-init, with PITR_S3_ENDPOINT_URL",),
            doc="Its secret key (read from a file by the services that use it)."),
    Setting("PITR_S3_REGION", "us-east-1", pattern(r"[a-z0-9-]{2,32}", "use a region name such as eu-central-1",
                                                   "eu-west-1"),
            section=BACKUPS, host=("db, pitr and bucket-init, with PITR_S3_ENDPOINT_URL",),
            doc="Region the requests to PITR_S3_ENDPOINT_URL are signed for (unused without it)."),
    Setting("PITR_ARTIFACT_COPY_MINUTES", "15", integer(0, 1440, "minutes"), section=BACKUPS, services=("pitr",),
            doc="With PITR_S3_ENDPOINT_URL: the artifact bucket is copied there this often, encrypted and "
                "incrementally (only what is missing there or newer here; nothing is deleted there). The most of "
                "artifacts a lost machine can cost. 0: no copy (e.g. artifacts already on a store outside, "
                "S3_ENDPOINT_URL)."),
    Setting("PITR_ARTIFACT_PASSPHRASE", GENERATED, secret(), section=BACKUPS, services=("pitr",),
            file="pitr_artifact_passphrase",
            doc="Encrypts the artifacts' copy off the machine (names and content; rclone crypt). Without it "
                "that copy cannot be read: keep it with .env (./show_all.sh --recovery-kit)."),
    Setting("PITR_WAL_MIN_FREE_PERCENT", "10", integer(0, 99, "percent"), section=BACKUPS, services=("db", "pitr"),
            doc="While the archive does not take WAL (its store down or full), PostgreSQL keeps the segments on the "
                "database's volume, and stops taking writes when it is full. Below this much free space there, "
                "they are given up instead (logged, alert PitrWalGivenUp): the database keeps working, and restores "
                "to moments after the first one given up wait for the next base backup, which pitr takes as soon as "
                "the archive works again. 0: never give up (the database stops when the volume is full)."),
    Setting("PITR_ARCHIVE_SECONDS", "60", integer(5, 3600, "seconds"), section=BACKUPS, services=("db", "pitr"),
            doc="PostgreSQL sends its WAL to the archive when a segment (16 MiB) fills, and at the latest this "
                "many seconds after a write (archive_timeout): the most of acknowledged writes that losing "
                "the database's disk can cost."),
    Setting("PITR_BASE_BACKUP_HOURS", "24", positive_number("hours"), section=BACKUPS, services=("pitr",),
            host=("show",),
            doc="Hours between base backups (where a restore to a point in time starts; the WAL since "
                "is replayed, so a shorter interval makes restores faster, not more precise)."),
    Setting("PITR_RETENTION_DAYS", "7", integer(1, 3650, "days"), section=BACKUPS, services=("pitr",),
            host=("show",),
            doc="Days back a restore may go (`db/db_volume_restore.sh --to-time`): older base backups and "
                "WAL are deleted."),
    Setting("PROMETHEUS_RETENTION_DAYS", "15", integer(1, 3650, "days"), section=BACKUPS, services=("prometheus",),
            doc="Days of metrics Prometheus keeps (profile monitoring)."),
    Setting("PROMETHEUS_ALERT_RULES", "", anything("/etc/mlflow-stack/alerts.yml"), section=BACKUPS,
            may_be_empty=True, services=("prometheus",), host=("preflight",),
            doc="Prometheus alert rules of your own (a file; relative to this project's folder, or absolute). "
                "Empty: the shipped monitoring/alerts.yml."),
    Setting("GC_OLDER_THAN_DAYS", "30", positive_number("days"), section=BACKUPS, services=("gc",),
            host=("show",),
            doc="Garbage collection (COMPOSE_PROFILES=gc, or ./stack_gc.sh) removes for good the runs, "
                "experiments and logged models deleted more than this many days ago, with their artifacts. "
                "Until then a deleted run can be restored (UI or API)."),
    Setting("GC_INTERVAL_HOURS", "24", positive_number("hours"), section=BACKUPS, services=("gc",),
            host=("show",), doc="Hours between scheduled garbage collections."),

    Setting("ALERT_WEBHOOK_URL", "", webhook(), section=ALERTS, may_be_empty=True, secret=True,
            file="alert_webhook_url", services=("alertmanager",), host=("show --test-alert",),
            doc="Alertmanager posts every alert that fires, and its resolution, to this URL as JSON "
                "(Alertmanager's webhook format: a chat bridge, an incident tool). Kept like a secret (such URLs "
                "often hold a token): the service reads it from a file."),
    Setting("ALERT_EMAIL_TO", "", emails(), section=ALERTS, may_be_empty=True, host=("alertmanager configuration", "show --test-alert"),
            doc="Who gets the alerts by e-mail (addresses separated by commas); needs ALERT_EMAIL_FROM and "
                "ALERT_SMTP_HOST."),
    Setting("ALERT_EMAIL_FROM", "", email(), section=ALERTS, may_be_empty=True, host=("alertmanager configuration",),
            doc="The sender of the alert e-mails."),
    Setting("ALERT_SMTP_HOST", "", host_and_port(), section=ALERTS, may_be_empty=True,
            host=("alertmanager configuration",), doc="The mail server that sends them, as host:port."),
    Setting("ALERT_SMTP_USERNAME", "", anything("alerts@example.org"), section=ALERTS, may_be_empty=True,
            host=("alertmanager configuration",),
            doc="Login at the mail server (empty: none; then ALERT_SMTP_PASSWORD stays empty too)."),
    Setting("ALERT_SMTP_PASSWORD", "", anything("x" * 20), section=ALERTS, may_be_empty=True, secret=True,
            file="alert_smtp_password", services=("alertmanager",), doc="Its password (read from a file)."),
    Setting("ALERT_SMTP_CA_FILE", "", anything("/etc/ssl/company-root-ca.pem"), section=ALERTS, may_be_empty=True,
            services=("alertmanager",), host=("preflight",),
            doc="The CA that issued the mail server's certificate (PEM), when it is not one of the system's: "
                "your company's own root, say (relative to this project's folder, or absolute). Empty: the "
                "system's CAs."),
    Setting("ALERT_SMTP_TLS", "true", choice("true", "false"), section=ALERTS, host=("alertmanager configuration",),
            doc="true: the mail goes only over STARTTLS, its certificate checked (false for a relay on your own "
                "network without TLS; it then takes mail without a login, which is never sent in clear)."),
    Setting("ALERT_GROUP_WAIT_SECONDS", "30", integer(1, 3600, "seconds"), section=ALERTS,
            host=("alertmanager configuration",),
            doc="How long Alertmanager waits after a first alert for others to send with it in one message."),
    Setting("ALERT_GROUP_INTERVAL_SECONDS", "300", integer(1, 86400, "seconds"), section=ALERTS,
            host=("alertmanager configuration",),
            doc="How soon a change to alerts already sent (another one firing, one resolved) is sent."),
    Setting("ALERT_REPEAT_HOURS", "4", integer(1, 168, "hours"), section=ALERTS, host=("alertmanager configuration",),
            doc="An alert still firing is sent again this often."),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def new_secret() -> str:
    # URL-safe, so it can sit in a database URI or an S3 key unquoted.
    return _secrets.token_urlsafe(24)


def default(key: str) -> str:
    return BY_KEY[key].default


def value(key: str, environ: Mapping[str, str]) -> str:
    """KEY from the environment (or its default), checked against its rule.

    For code that reads a setting outside the host scripts (the images'
    entrypoints): the same default and rule as .env validation.
    """
    setting = BY_KEY[key]
    raw = environ.get(key)
    if raw is None or (raw == "" and not setting.may_be_empty):
        if setting.generated:
            raise SettingError(f"{key} is not set: it is generated into .env by ./stack_deploy.sh")
        raw = setting.default
    if not (raw == "" and setting.may_be_empty):
        setting.rule(key, raw)
    return raw


# --- Validation of a whole .env ------------------------------------------

def _distinct_ports(values: Mapping[str, str]) -> list[str]:
    seen: dict[str, str] = {}
    errors = []
    for key in ("HTTPS_PORT", "HTTP_PORT", "S3_PORT"):
        number = values.get(key)
        if number is None:
            continue
        if number in seen:
            errors.append(f"{seen[number]} and {key} are the same port: each needs its own")
        else:
            seen[number] = key
    return errors


def _tls_pair(values: Mapping[str, str]) -> list[str]:
    if bool(values.get("TLS_CERT_FILE")) != bool(values.get("TLS_KEY_FILE")):
        return ["set both TLS_CERT_FILE and TLS_KEY_FILE (your certificate and its key), or neither"]
    if values.get("TLS_CA_FILE") and not values.get("TLS_CERT_FILE"):
        return ["TLS_CA_FILE is the CA of your own certificate: set TLS_CERT_FILE and TLS_KEY_FILE too, or "
                "leave it empty (the local CA the deploy makes is named in the client settings anyway)"]
    return []


def connections_needed(values: Mapping[str, str]) -> int:
    return int(values["MLFLOW_REPLICAS"]) * int(values["MLFLOW_WORKERS"]) * CONNECTIONS_PER_WORKER \
        + CONNECTIONS_OTHERS


def _connections_fit(values: Mapping[str, str]) -> list[str]:
    # A PostgreSQL outside the stack has its own limit: the deploy's store check compares.
    if not {"MLFLOW_REPLICAS", "MLFLOW_WORKERS", "POSTGRES_MAX_CONNECTIONS"} <= set(values) \
            or values.get("POSTGRES_HOST"):
        return []
    needed, limit = connections_needed(values), int(values["POSTGRES_MAX_CONNECTIONS"])
    if needed <= limit:
        return []
    return [f"MLFLOW_REPLICAS={values['MLFLOW_REPLICAS']} x MLFLOW_WORKERS={values['MLFLOW_WORKERS']} may open "
            f"{needed} database connections ({CONNECTIONS_PER_WORKER} per worker, {CONNECTIONS_OTHERS} for the "
            f"rest), more than POSTGRES_MAX_CONNECTIONS={limit}: raise it to {needed} (at most 5000) or lower "
            "the other two"]


def _address_rate_covers_a_login(values: Mapping[str, str]) -> list[str]:
    if {"API_RATE_PER_LOGIN", "API_RATE_PER_ADDRESS"} <= set(values) \
            and int(values["API_RATE_PER_ADDRESS"]) < int(values["API_RATE_PER_LOGIN"]):
        return ["API_RATE_PER_ADDRESS is below API_RATE_PER_LOGIN: one client address would be held under "
                "what one login may send; raise it to at least API_RATE_PER_LOGIN"]
    return []


def _roles_are_distinct(values: Mapping[str, str]) -> list[str]:
    from .common import MONITOR_ROLE, SERVER_ROLE

    if values.get("POSTGRES_USER") in (SERVER_ROLE, MONITOR_ROLE):
        return [f"POSTGRES_USER={values['POSTGRES_USER']} is the name of a role the stack makes for its services: "
                "choose another"]
    return []


def _jobs_on_one_replica(values: Mapping[str, str]) -> list[str]:
    if values.get("MLFLOW_ENABLE_JOBS") == "true" and int(values.get("MLFLOW_REPLICAS", "1")) > 1:
        return ["MLFLOW_ENABLE_JOBS=true needs MLFLOW_REPLICAS=1: each MLflow server keeps its own job queue "
                "and runs its own periodic tasks, so replicas would run them twice; set one of the two back"]
    return []


def _archive_off_site(values: Mapping[str, str]) -> list[str]:
    endpoint = values.get("PITR_S3_ENDPOINT_URL", "").rstrip("/")
    if endpoint and endpoint == values.get("S3_ENDPOINT_URL", "").rstrip("/"):
        return ["PITR_S3_ENDPOINT_URL is S3_ENDPOINT_URL, the artifacts' store, where the archive is already: "
                "empty it (and PITR_S3_ACCESS_KEY/PITR_S3_SECRET_KEY), or name a store at another site"]
    keys = [key for key in ("PITR_S3_ACCESS_KEY", "PITR_S3_SECRET_KEY") if values.get(key)]
    if values.get("PITR_S3_ENDPOINT_URL") and len(keys) < 2:
        return ["PITR_S3_ENDPOINT_URL is set without PITR_S3_ACCESS_KEY and PITR_S3_SECRET_KEY: set both, the key "
                "of that store that may use PITR_BUCKET"]
    if keys and not values.get("PITR_S3_ENDPOINT_URL"):
        return ["PITR_S3_ACCESS_KEY or PITR_S3_SECRET_KEY is set without PITR_S3_ENDPOINT_URL: set the store's URL "
                "too, or empty them (the archive then stays on the stack's own store)"]
    return []


def archive_off_site(values: Mapping[str, str]) -> bool:
    """The point-in-time archive is on a store of its own (PITR_S3_ENDPOINT_URL, another than
    the artifacts'), for the stack's own PostgreSQL. The one home of that decision."""
    endpoint = values.get("PITR_S3_ENDPOINT_URL", "").rstrip("/")
    return bool(endpoint) and endpoint != values.get("S3_ENDPOINT_URL", "").rstrip("/") \
        and not values.get("POSTGRES_HOST")


def _archive_beside_artifacts(values: Mapping[str, str]) -> list[str]:
    # A logical restore replaces every object of MLFLOW_BUCKET: the archive with them (unless
    # the archive is on another store).
    if archive_off_site(values):
        return []
    if values.get("PITR_BUCKET") and values.get("PITR_BUCKET") == values.get("MLFLOW_BUCKET"):
        return [f"PITR_BUCKET and MLFLOW_BUCKET are both {values['MLFLOW_BUCKET']}: the database's archive needs a "
                "bucket of its own (a restore replaces every object of the artifact bucket)"]
    return []


def profile_on(values: Mapping[str, str], name: str) -> bool:
    """Whether COMPOSE_PROFILES chooses the optional profile `name` (monitoring, backup, gc)."""
    return name in values.get("COMPOSE_PROFILES", "").split(",")


def alert_receivers(values: Mapping[str, str]) -> list[str]:
    """The kinds of receiver .env sets: webhook, email."""
    return [kind for kind, key in (("webhook", "ALERT_WEBHOOK_URL"), ("email", "ALERT_EMAIL_TO")) if values.get(key)]


def _alerts_reach_someone(values: Mapping[str, str]) -> list[str]:
    errors = []
    if values.get("ALERT_EMAIL_TO"):
        missing = [key for key in ("ALERT_EMAIL_FROM", "ALERT_SMTP_HOST") if not values.get(key)]
        if missing:
            errors.append(f"ALERT_EMAIL_TO is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not: set the sender and the mail server (host:port) too")
    if bool(values.get("ALERT_SMTP_USERNAME")) != bool(values.get("ALERT_SMTP_PASSWORD")):
        errors.append("ALERT_SMTP_USERNAME and ALERT_SMTP_PASSWORD go together: set both, or neither for a mail "
                      "server that takes mail without a login")
    if values.get("ALERT_SMTP_USERNAME") and values.get("ALERT_SMTP_TLS") == "false":
        errors.append("ALERT_SMTP_USERNAME is set with ALERT_SMTP_TLS=false: a login is never sent in clear "
                      "(Alertmanager refuses to); set ALERT_SMTP_TLS=true, or empty the login for a relay that "
                      "takes mail without one")
    if alert_receivers(values) and not profile_on(values, "monitoring"):
        errors.append("ALERT_WEBHOOK_URL or ALERT_EMAIL_TO is set, but COMPOSE_PROFILES has no monitoring: the "
                      "alerts come from the monitoring profile; add monitoring to COMPOSE_PROFILES (or empty them)")
    return errors


def _outside_is_outside(values: Mapping[str, str]) -> list[str]:
    own = {"db", "minio", "localhost", "127.0.0.1"}
    named = [f"{key}={values[key]}" for key, host in (("POSTGRES_HOST", values.get("POSTGRES_HOST", "")),
                                                     ("S3_ENDPOINT_URL", re.sub(r"^https?://|[:/].*$", "",
                                                                                values.get("S3_ENDPOINT_URL", ""))))
             if host in own]
    if named:
        return [f"{', '.join(named)}: that names the stack's own store (or the container itself), not one outside "
                "the stack; leave it empty for the stack's own, or give the outside store's host name or address"]
    return []


def _stores_outside_with_monitoring(values: Mapping[str, str]) -> list[str]:
    if profile_on(values, "monitoring") and len(own_stores(values)) < len(STORES_SETTINGS):
        return ["COMPOSE_PROFILES has monitoring, but POSTGRES_HOST or S3_ENDPOINT_URL names a store the stack "
                "does not run: the monitoring profile watches the stack's own stores and volumes only (not "
                "available with external stores yet); take monitoring out of COMPOSE_PROFILES, or the store "
                "settings"]
    return []


# The stores: the service (with a Compose profile of the same name) the stack runs
# unless the setting names one outside, and the name `check-stores` knows it by.
STORES_SETTINGS = (("db", "POSTGRES_HOST", "postgres"), ("minio", "S3_ENDPOINT_URL", "s3"))


def own_stores(values: Mapping[str, str]) -> list[str]:
    """db unless POSTGRES_HOST names another server, minio unless S3_ENDPOINT_URL names another store."""
    return [service for service, key, _ in STORES_SETTINGS if not values.get(key)]


def outside_stores(values: Mapping[str, str]) -> list[str]:
    """The stores outside the stack, as `check-stores` names them (postgres, s3)."""
    return [name for _, key, name in STORES_SETTINGS if values.get(key)]


def compose_profiles(values: Mapping[str, str]) -> str:
    """COMPOSE_PROFILES as Compose gets it: the optional services chosen, and the stores the stack runs."""
    chosen = [p for p in values.get("COMPOSE_PROFILES", "").split(",") if p]
    return ",".join(chosen + own_stores(values))


# Rules that span keys; each sees only values that passed their own rule.
CROSS_CHECKS: tuple[Callable[[Mapping[str, str]], list[str]], ...] = (
    _distinct_ports, _tls_pair, _connections_fit, _jobs_on_one_replica, _address_rate_covers_a_login,
    _roles_are_distinct,
    _stores_outside_with_monitoring, _outside_is_outside, _archive_beside_artifacts, _archive_off_site,
    _alerts_reach_someone)


def key_errors(key: str, values: Mapping[str, str]) -> list[str]:
    setting = BY_KEY[key]
    if key not in values:
        return [f"{key} is missing (a setting newer than this .env): run `python3 -m stack env` to add the new "
                "settings (secrets generated; nothing else changes), or ./stack_deploy.sh"]
    raw = values[key]
    if raw == "":
        return [] if setting.may_be_empty else [f"{key} is empty: set it (see .env.example)"]
    if setting.generated and raw == GENERATED:
        return [f"{key} is still {GENERATED}: delete the line and run ./stack_deploy.sh to generate it"]
    try:
        setting.rule(key, raw)
    except SettingError as exc:
        if setting.sensitive:
            # Never echo a secret, not even a rejected one.
            return [f"{key} is too short: use at least {MIN_SECRET_LENGTH} characters" if setting.generated
                    else f"{key} is not valid: {setting.rule.advice}"]
        return [str(exc)]
    return []


def validate(values: Mapping[str, str]) -> list[str]:
    """Every problem with the values, each with what to do; empty when all is well."""
    errors: list[str] = []
    good = {}
    for setting in SETTINGS:
        problems = key_errors(setting.key, values)
        errors += problems
        if not problems and setting.key in values:
            good[setting.key] = values[setting.key]
    for check in CROSS_CHECKS:
        errors += check(good)
    return errors


# --- Generated documents ---------------------------------------------------

EXAMPLE_HEADER = """\
# MLflow stack settings. ./stack_deploy.sh copies this to .env on first run
# and fills every value marked <generated> with a fresh random secret; it never
# overwrites an existing .env. .env is private (mode 600, not in git).
#
# Generated from stack/settings.py (python3 -m stack.settings write): edit
# that table, not this file.
"""


def example_text() -> str:
    lines = [EXAMPLE_HEADER.rstrip("\n")]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines += ["", f"# --- {section} " + "-" * max(3, 74 - len(section))]
        lines += textwrap.wrap(s.doc, 78, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"{s.key}={s.default}")
    return "\n".join(lines) + "\n"


TABLE_BEGIN = "<!-- settings table: generated by python3 -m stack.settings write -->"
TABLE_END = "<!-- end of settings table -->"
# The configuration reference that holds the table.
TABLE_PAGE = Path("docs") / "configuration.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_table() -> str:
    rows = ["| key | default | read by | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        shown = "generated" if s.generated else (f"`{s.default}`" if s.default else "empty")
        readers = ", ".join((*s.services, *s.host)) or "-"
        rows.append(f"| `{s.key}` | {shown} | {_cell(readers)} | {_cell(s.doc)} |")
    return "\n".join([TABLE_BEGIN, *rows, TABLE_END])


TOPOLOGY_BEGIN = "<!-- topology table: generated by python3 -m stack.settings write -->"
TOPOLOGY_END = "<!-- end of topology table -->"


def topology_table() -> str:
    from . import common

    rows = ["| service or port | internal port | what listens |", "|---|---|---|"]
    rows += [f"| `{name}` | {port} | {_cell(what)} |" for name, (port, what) in common.TOPOLOGY.items()]
    rows += ["", f"The MLflow image runs as user and group {common.IMAGE_UID}."]
    return "\n".join([TOPOLOGY_BEGIN, *rows, TOPOLOGY_END])


def page_with_table(page: str) -> str:
    for begin, end_marker, table in ((TABLE_BEGIN, TABLE_END, settings_table()),
                                     (TOPOLOGY_BEGIN, TOPOLOGY_END, topology_table())):
        start, end = page.index(begin), page.index(end_marker) + len(end_marker)
        page = page[:start] + table + page[end:]
    return page


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    if argv[1:] != ["write"]:
        print(f"usage: python3 -m stack.settings write   (regenerates .env.example and the table in {TABLE_PAGE})",
              file=sys.stderr)
        return 2
    (root / ".env.example").write_text(example_text())
    page = root / TABLE_PAGE
    page.write_text(page_with_table(page.read_text()))
    print(f"wrote .env.example and the settings and topology tables in {TABLE_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
