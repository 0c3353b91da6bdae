"""What Compose is given besides .env: the stack's derived values, and the
placeholders that let `docker compose down/ps` work before a first deploy.

Shell gets these only as `export` lines quoted with shlex.quote (see
`export_lines`); it never parses .env itself.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path
from typing import Iterable, Mapping

from . import alerts, common, envfile, paths, pins, secretfiles, settings, standins, tls

PLACEHOLDER_SECRET = "placeholder-not-a-secret"
# The secret files that may hold the point-in-time archive's keys.
PITR_KEYS = ("pitr_s3_access_key", "pitr_s3_secret_key", "minio_root_user", "minio_root_password")


def export_lines(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"export {key}={shlex.quote(str(value))}\n" for key, value in pairs)


def values_for_compose(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """.env's effective values, with the table's default for any key it lacks.

    For commands that only look at or take down the stack (ps, logs, down):
    they must work with an old .env, or none at all. A deploy validates first.
    """
    environ = os.environ if environ is None else environ
    path = paths.env_path(environ)
    values = envfile.effective(envfile.parse(path.read_text(), str(path)), environ) if path.exists() else {}
    for s in settings.SETTINGS:
        if s.key not in values:
            values[s.key] = environ.get(s.key, PLACEHOLDER_SECRET if s.generated else s.default) \
                if s.from_shell else s.default
    return values


def derived(values: Mapping[str, str], create: bool,
            environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Values Compose reads that are not .env keys. create=False makes nothing
    (no certificate, no secret files): for commands that do not start services."""
    environ = os.environ if environ is None else environ
    material = tls.ensure(values, create=create, environ=environ)
    rules = alert_rules(values)
    folder = secretfiles.secrets_dir(environ)
    if create:
        secretfiles.write(values, folder)
    alertmanager = alerts.write(values, environ) if create else alerts.config_path(environ)
    pairs = [
        ("COMPOSE_PROJECT_NAME", paths.project_name(environ)),
        ("STACK_VERSION", common.stack_version()),
        ("STACK_TLS_CERT", material["cert"]),
        ("STACK_TLS_KEY", material["key"]),
        ("STACK_TLS_TRUST", material["trust"]),
        ("STACK_SECRETS_DIR", str(folder)),
        ("BACKUP_DIR", str(paths.backup_dir(values))),
        ("NGINX_METRICS_LOG", common.nginx_metrics_log(values["COMPOSE_PROFILES"])),
        ("STACK_STORE_FULL_MESSAGE", common.STORE_FULL_MESSAGE),
        ("STACK_ALERT_RULES", str(rules)),
        ("STACK_NGINX_CONFIG_DIGEST", files_digest([paths.ROOT / "nginx" / "templates",
                                                    paths.ROOT / "nginx" / "15-stack-token.sh", Path(material["cert"])])),
        ("STACK_SECRETS_DIGEST", secretfiles.digest(values)),
        # Only the secrets each reads: db the archive's keys (the artifact store's unless PITR_S3_*),
        # pitr those and the artifacts' passphrase. They restart when these change, not for others.
        ("STACK_DB_KEYS_DIGEST", secretfiles.digest(values, PITR_KEYS)),
        ("STACK_PITR_KEYS_DIGEST", secretfiles.digest(values, (*PITR_KEYS, "pitr_artifact_passphrase"))),
        ("STACK_PROMETHEUS_CONFIG_DIGEST", files_digest([paths.ROOT / "monitoring" / "prometheus.yml", rules])),
        ("STACK_ALERTMANAGER_CONFIG", str(alertmanager)),
        ("STACK_ALERTMANAGER_CONFIG_DIGEST", files_digest([alertmanager, alerts.smtp_ca(values)])),
        ("STACK_ALERT_SMTP_CA", str(alerts.smtp_ca(values))),
        *stores(values),
    ]
    if values["MLFLOW_VARIANT"] == "conda":
        base = next(u for u in pins.upstream_images(values, environ) if u.base)
        if not base.overridden:
            pairs.append(("MLFLOW_BASE_IMAGE", base.image))
    # Stand-ins this stack was deployed with (STACK_STANDINS=true), unless overridden.
    pairs += sorted(standins.in_use(values, environ).items())
    return pairs


def files_digest(sources: Iterable[Path]) -> str:
    """A digest of files (a folder: its files) that a service reads only when it starts.
    Given to it as a label, so that a deploy recreates it when they changed: an
    upgrade's nginx templates, a renewed certificate, edited alert rules. Compose
    itself sees only that the same paths are mounted."""
    digest = hashlib.sha256()
    for source in sources:
        files = sorted(f for f in source.rglob("*") if f.is_file()) if source.is_dir() else [source]
        for f in files:
            digest.update(f"{f.relative_to(source) if source.is_dir() else f.name}\0".encode())
            try:
                digest.update(f.read_bytes())
            except OSError:
                # Missing or unreadable here (`ps` before a first deploy; a root-only
                # certificate): the deploy's own checks say so, not a traceback here.
                digest.update(b"(unreadable)")
    return digest.hexdigest()[:16]


def alert_rules(values: Mapping[str, str]) -> Path:
    """PROMETHEUS_ALERT_RULES (relative to the project's folder), or the shipped rules."""
    chosen = Path(values.get("PROMETHEUS_ALERT_RULES") or paths.ROOT / "monitoring" / "alerts.yml").expanduser()
    return (chosen if chosen.is_absolute() else paths.ROOT / chosen).resolve()


def stores(values: Mapping[str, str]) -> list[tuple[str, str]]:
    """Where the services find the two stores: the stack's own (db, minio) or those
    POSTGRES_HOST and S3_ENDPOINT_URL name. A store outside needs a route out of
    the backend network, which otherwise has none."""
    own = settings.own_stores(values)
    return [
        ("STACK_OWN_STORES", " ".join(own)),
        ("STACK_OUTSIDE_STORES", " ".join(settings.outside_stores(values))),
        # What a PostgreSQL outside must allow (the stack's own gets POSTGRES_MAX_CONNECTIONS).
        ("STACK_CONNECTIONS_NEEDED", str(settings.connections_needed(values))),
        ("STACK_POSTGRES_HOST", "db" if "db" in own else values["POSTGRES_HOST"]),
        ("STACK_POSTGRES_PORT", str(common.port("db")) if "db" in own else values["POSTGRES_PORT"]),
        # The server's and gc's login: the stack's own role, or POSTGRES_USER on a server outside.
        ("STACK_POSTGRES_SERVER_ROLE", common.SERVER_ROLE if "db" in own else values["POSTGRES_USER"]),
        ("STACK_POSTGRES_SERVER_PASSWORD_NAME", "postgres_server_password" if "db" in own else "postgres_password"),
        ("STACK_POSTGRES_MONITOR_ROLE", common.MONITOR_ROLE),
        # The point-in-time archive's bucket, made by bucket-init: only for the stack's own
        # PostgreSQL (a server outside has its provider's point-in-time recovery).
        ("STACK_PITR_BUCKET", values["PITR_BUCKET"] if "db" in own else ""),
        ("STACK_S3_ENDPOINT", common.OWN_S3_ENDPOINT if "minio" in own else values["S3_ENDPOINT_URL"].rstrip("/")),
        # The archive's store: the artifacts' (its keys), or the one off the machine.
        *archive_store(values, own),
        ("STACK_BACKEND_INTERNAL", "true" if len(own) == len(settings.STORES_SETTINGS)
         and not settings.archive_off_site(values) else "false"),
    ]


def archive_store(values: Mapping[str, str], own: list[str]) -> list[tuple[str, str]]:
    """Where the point-in-time archive is: PITR_S3_ENDPOINT_URL with its keys (off the
    machine), or the artifact store with the artifacts' keys."""
    if settings.archive_off_site(values):
        return [("STACK_PITR_OFF_SITE", "true"),
                ("STACK_PITR_ENDPOINT", values["PITR_S3_ENDPOINT_URL"].rstrip("/")),
                ("STACK_PITR_REGION", values["PITR_S3_REGION"]),
                ("STACK_PITR_ACCESS_KEY_NAME", "pitr_s3_access_key"),
                ("STACK_PITR_SECRET_KEY_NAME", "pitr_s3_secret_key")]
    return [("STACK_PITR_OFF_SITE", ""),
            ("STACK_PITR_ENDPOINT", common.OWN_S3_ENDPOINT if "minio" in own else values["S3_ENDPOINT_URL"].rstrip("/")),
            ("STACK_PITR_REGION", values["S3_REGION"]),
            ("STACK_PITR_ACCESS_KEY_NAME", "minio_root_user"),
            ("STACK_PITR_SECRET_KEY_NAME", "minio_root_password")]


def environment(values: Mapping[str, str], create: bool,
                environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Every non-secret setting (validated or defaulted), then the derived values."""
    plain = [(s.key, values[s.key]) for s in settings.SETTINGS if not s.sensitive and s.key != "BACKUP_DIR"]
    return plain + derived(values, create, environ)


def invocation(environ: Mapping[str, str] | None = None, on_swarm: bool = False) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for `docker compose` on this stack; append the subcommand.
    on_swarm: for `run --no-deps` of a one-off job on the swarm stack's stores network.

    Values already in the environment (a deploy's exports) win; the rest come
    from .env or the table's defaults, so that looking at or taking down a
    stack works with an old .env, or none.
    """
    env = dict(os.environ if environ is None else environ)
    values = values_for_compose(env)
    for key, value in environment(values, create=False, environ=env):
        env.setdefault(key, value)
    # What only .env decides, and what follows from it, even over a stale export in the shell.
    for s in settings.SETTINGS:
        if not s.from_shell and not s.sensitive:
            env[s.key] = values[s.key]
    env.update(stores(values))
    # The stores the stack runs are services under profiles of their own, added
    # here on every call (never exported: COMPOSE_PROFILES in the shell is the user's).
    env["COMPOSE_PROFILES"] = settings.compose_profiles({**values, "COMPOSE_PROFILES": env["COMPOSE_PROFILES"]})
    argv = paths.compose_cmd(env, on_swarm)
    if not paths.env_path(env).exists():
        argv[argv.index("--env-file") + 1] = os.devnull
    return argv, env
