"""The stack's .env: create it from .env.example, complete it, check it.

Rules: an existing .env is never overwritten or reordered. Keys that a newer
.env.example added are appended (secrets generated), and nothing else is
touched, so re-running changes nothing once the file is complete. The file is
private (mode 600). Values are never printed, except where the user asks for
the client settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

GENERATED = "<generated>"
SECRET_KEYS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY")
ALLOW_EMPTY = ("COMPOSE_PROFILES", "TLS_CERT_FILE", "TLS_KEY_FILE")
MIN_SECRET_LENGTH = 16
VARIANTS = {"pip": "Dockerfile", "conda": "Dockerfile-conda"}
_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PG_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class EnvError(Exception):
    """.env is missing, malformed or has bad values; the message says how to fix it."""


def parse(text: str, source: str = ".env") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(raw)
        if not match:
            raise EnvError(f"{source}:{number}: not a KEY=value line: {line[:40]!r}")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in values:
            raise EnvError(f"{source}:{number}: {key} is set twice; keep one")
        values[key] = value
    return values


def new_secret() -> str:
    # URL-safe, so it can sit in a database URI or an S3 key unquoted.
    return secrets.token_urlsafe(24)


@dataclass
class Plan:
    """What ensure() would do, so --dry-run can show it without doing it."""

    create: bool = False
    added: list[str] = field(default_factory=list)
    variant_change: tuple[str, str] | None = None
    text: str = ""

    @property
    def changes(self) -> bool:
        return self.create or bool(self.added) or self.variant_change is not None


def plan(env_path: Path, example_path: Path, variant: str | None = None) -> Plan:
    example_text = example_path.read_text()
    example = parse(example_text, example_path.name)
    result = Plan()
    if not env_path.exists():
        result.create = True
        lines = []
        for raw in example_text.splitlines():
            match = _LINE.match(raw)
            if match and match.group(2).strip() == GENERATED:
                raw = f"{match.group(1)}={new_secret()}"
            lines.append(raw)
        text = "\n".join(lines) + "\n"
    else:
        text = env_path.read_text()
        current = parse(text, str(env_path))
        missing = [k for k in example if k not in current]
        if missing:
            result.added = missing
            extra = ["", "# Added by ./stack_deploy.sh from a newer .env.example"]
            for key in missing:
                value = example[key]
                extra.append(f"{key}={new_secret() if value == GENERATED else value}")
            text = text.rstrip("\n") + "\n" + "\n".join(extra) + "\n"
    if variant is not None:
        if variant not in VARIANTS:
            raise EnvError(f"--variant {variant}: use one of {', '.join(VARIANTS)}")
        values = parse(text)
        old = values.get("MLFLOW_VARIANT", "pip")
        if old != variant:
            result.variant_change = (old, variant)
            text = re.sub(r"(?m)^MLFLOW_VARIANT=.*$", f"MLFLOW_VARIANT={variant}", text)
    result.text = text
    return result


def write_private(path: Path, text: str) -> None:
    """Atomic write with mode 600 from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".env.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure(env_path: Path, example_path: Path, variant: str | None = None) -> Plan:
    result = plan(env_path, example_path, variant)
    if result.changes:
        write_private(env_path, result.text)
    elif env_path.exists() and env_path.stat().st_mode & 0o077:
        os.chmod(env_path, 0o600)
    return result


def _port(values: dict[str, str], key: str, errors: list[str]) -> int | None:
    raw = values.get(key, "")
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        errors.append(f"{key}={raw!r}: use a port number between 1 and 65535")
        return None
    return int(raw)


def validate(values: dict[str, str], example: dict[str, str]) -> list[str]:
    """Every problem with .env, each with what to do; empty when all is well."""
    errors: list[str] = []
    for key in example:
        if key not in values:
            errors.append(f"{key} is missing: run ./stack_deploy.sh to add it, or copy it from .env.example")
        elif values[key] == "" and key not in ALLOW_EMPTY:
            errors.append(f"{key} is empty: set it (see .env.example)")
    # Each check below runs only when its keys are there, so one run lists everything.
    v = {k: val for k, val in values.items() if val != ""}
    for key in SECRET_KEYS:
        if key not in v:
            continue
        if v[key] == GENERATED:
            errors.append(f"{key} is still {GENERATED}: delete the line and run ./stack_deploy.sh to generate it")
        elif len(v[key]) < MIN_SECRET_LENGTH:
            errors.append(f"{key} is shorter than {MIN_SECRET_LENGTH} characters: use a longer one")
    if "MINIO_ROOT_USER" in v and len(v["MINIO_ROOT_USER"]) < 3:
        errors.append("MINIO_ROOT_USER must have at least 3 characters")
    for key in ("POSTGRES_USER", "POSTGRES_DB"):
        if key in v and not _PG_NAME.match(v[key]):
            errors.append(f"{key}={v[key]!r}: use lower-case letters, digits and _ (start with a letter)")
    if "MLFLOW_BUCKET" in v and not _BUCKET.match(v["MLFLOW_BUCKET"]):
        errors.append(f"MLFLOW_BUCKET={v['MLFLOW_BUCKET']!r}: use 3-63 lower-case letters, digits, '.' or '-'")
    port_keys = ("HTTPS_PORT", "HTTP_PORT", "S3_PORT")
    ports = {key: _port(v, key, errors) for key in port_keys if key in v}
    seen: dict[int, str] = {}
    for key, number in ports.items():
        if number is not None and number in seen:
            errors.append(f"{seen[number]} and {key} are the same port: each needs its own")
        elif number is not None:
            seen[number] = key
    if bool(v.get("TLS_CERT_FILE")) != bool(v.get("TLS_KEY_FILE")):
        errors.append("set both TLS_CERT_FILE and TLS_KEY_FILE (your certificate and its key), or neither")
    if "MLFLOW_ADMIN_USERNAME" in v and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", v["MLFLOW_ADMIN_USERNAME"]):
        errors.append(f"MLFLOW_ADMIN_USERNAME={v['MLFLOW_ADMIN_USERNAME']!r}: use letters, digits and _ . @ -")
    if "MLFLOW_PUBLIC_HOST" in v and not _valid_host(v["MLFLOW_PUBLIC_HOST"]):
        errors.append(f"MLFLOW_PUBLIC_HOST={v['MLFLOW_PUBLIC_HOST']!r}: use a host name (mlflow.example.com) "
                      "or an IP address, without scheme or port")
    if "BIND_ADDRESS" in v:
        try:
            ipaddress.ip_address(v["BIND_ADDRESS"])
        except ValueError:
            errors.append(f"BIND_ADDRESS={v['BIND_ADDRESS']!r}: use an IP address (0.0.0.0 or 127.0.0.1)")
    choices = {"MLFLOW_VARIANT": ("pip", "conda"), "MLFLOW_ARTIFACTS_MODE": ("proxied", "direct"),
               "MLFLOW_ENABLE_JOBS": ("true", "false"), "MLFLOW_AUTH": ("true", "false"),
               "MLFLOW_DEFAULT_PERMISSION": ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")}
    for key, allowed in choices.items():
        if key in v and v[key] not in allowed:
            errors.append(f"{key}={v[key]!r}: use {' or '.join(allowed)}")
    if v.get("COMPOSE_PROFILES", "") not in ("", "backup"):
        errors.append(f"COMPOSE_PROFILES={v['COMPOSE_PROFILES']!r}: leave it empty, or set backup for scheduled backups")
    hours = v.get("BACKUP_INTERVAL_HOURS")
    if hours is not None and not (re.fullmatch(r"\d+(\.\d+)?", hours) and float(hours) > 0):
        errors.append(f"BACKUP_INTERVAL_HOURS={hours!r}: use a positive number of hours")
    keep = v.get("BACKUP_KEEP")
    if keep is not None and (not keep.isdigit() or int(keep) < 1):
        errors.append(f"BACKUP_KEEP={keep!r}: use a whole number of 1 or more")
    cache = v.get("MLFLOW_AUTH_CACHE_SECONDS")
    if cache is not None and (not cache.isdigit() or int(cache) > 3600):
        errors.append(f"MLFLOW_AUTH_CACHE_SECONDS={cache!r}: use a whole number of seconds from 0 to 3600")
    workers = v.get("MLFLOW_WORKERS")
    if workers is not None and (not workers.isdigit() or not 1 <= int(workers) <= 64):
        errors.append(f"MLFLOW_WORKERS={workers!r}: use a whole number from 1 to 64")
    return errors


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def effective(values: dict[str, str], environ=None) -> dict[str, str]:
    """What Compose will use: a variable set in the shell wins over .env."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key, value) for key, value in values.items()}


def load_checked(env_path: Path, example_path: Path) -> dict[str, str]:
    if not env_path.exists():
        raise EnvError(f"{env_path} does not exist: run ./stack_deploy.sh to create it")
    values = effective(parse(env_path.read_text(), str(env_path)))
    errors = validate(values, parse(example_path.read_text(), example_path.name))
    if errors:
        raise EnvError(f"{env_path} has problems:\n  - " + "\n  - ".join(errors))
    return values
