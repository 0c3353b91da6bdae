"""The stack's .env: create it, complete it, check it (rules: stack/settings.py).

Rules: an existing .env is never overwritten or reordered. Keys that a newer
settings table added are appended (secrets generated), and nothing else is
touched, so re-running changes nothing once the file is complete. The file is
private (mode 600). Values are never printed, except where the user asks for
the client settings.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import host, settings

GENERATED = settings.GENERATED
_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")


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


@dataclass
class Plan:
    """What ensure() would do, so --dry-run can show it without doing it."""

    create: bool = False
    added: list[str] = field(default_factory=list)
    # Keys a command-line option sets: KEY -> (old value, new value).
    switched: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Values a new file got from this machine rather than the table: KEY -> value.
    detected: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def variant_change(self) -> tuple[str, str] | None:
        return self.switched.get("MLFLOW_VARIANT")

    @property
    def changes(self) -> bool:
        return self.create or bool(self.added) or bool(self.switched)


def _switch(result: Plan, key: str, new: str, option: str) -> None:
    """Set KEY to NEW in result.text (the line exists: new files and added keys have it)."""
    try:
        settings.BY_KEY[key].rule(option, new)
    except settings.SettingError as exc:
        raise EnvError(str(exc)) from None
    old = parse(result.text).get(key, settings.default(key))
    if old != new:
        result.switched[key] = (old, new)
        result.text = re.sub(rf"(?m)^{key}=.*$", f"{key}={new}", result.text)


def plan(env_path: Path, variant: str | None = None, standins: bool = False) -> Plan:
    result = Plan()
    if not env_path.exists():
        result.create = True
        lines = []
        for raw in settings.example_text().splitlines():
            match = _LINE.match(raw)
            if match and match.group(2).strip() == GENERATED:
                raw = f"{match.group(1)}={settings.new_secret()}"
            lines.append(raw)
        text = "\n".join(lines) + "\n"
        if "MLFLOW_PUBLIC_HOST" not in os.environ:
            # The name colleagues reach this machine by, not the table's localhost.
            reachable = host.reachable_name()
            if reachable:
                result.detected["MLFLOW_PUBLIC_HOST"] = reachable
                text = re.sub(r"(?m)^MLFLOW_PUBLIC_HOST=.*$", f"MLFLOW_PUBLIC_HOST={reachable}", text)
    else:
        text = env_path.read_text()
        current = parse(text, str(env_path))
        missing = [s for s in settings.SETTINGS if s.key not in current]
        if missing:
            result.added = [s.key for s in missing]
            extra = ["", "# Added by ./stack_deploy.sh (new settings; see .env.example)"]
            extra += [f"{s.key}={settings.new_secret() if s.generated else s.default}" for s in missing]
            text = text.rstrip("\n") + "\n" + "\n".join(extra) + "\n"
    result.text = text
    if variant is not None:
        _switch(result, "MLFLOW_VARIANT", variant, "--variant")
    if standins:
        _switch(result, "STACK_STANDINS", "true", "--standins")
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


def ensure(env_path: Path, variant: str | None = None, standins: bool = False) -> Plan:
    result = plan(env_path, variant, standins)
    if result.changes:
        write_private(env_path, result.text)
    elif env_path.exists() and env_path.stat().st_mode & 0o077:
        os.chmod(env_path, 0o600)
    return result


def effective(values: dict[str, str], environ=None) -> dict[str, str]:
    """What Compose will use: a variable set in the shell wins over .env (except
    for the settings that only .env sets, Setting.from_shell)."""
    environ = os.environ if environ is None else environ
    return {key: environ.get(key, value) if from_shell(key) else value for key, value in values.items()}


def from_shell(key: str) -> bool:
    setting = settings.BY_KEY.get(key)
    return setting is None or setting.from_shell


def check(values: dict[str, str], source: Path) -> dict[str, str]:
    errors = settings.validate(values)
    if errors:
        raise EnvError(f"{source} has problems:\n  - " + "\n  - ".join(errors))
    return values


def load(env_path: Path) -> dict[str, str]:
    """The effective values of an existing .env, unchecked."""
    if not env_path.exists():
        raise EnvError(f"{env_path} does not exist: run ./stack_deploy.sh to create it")
    return effective(parse(env_path.read_text(), str(env_path)))


def load_checked(env_path: Path, environ=None) -> dict[str, str]:
    """The effective values, checked. A setting newer than the .env (the project
    was updated, not yet deployed) takes its default, so that show, backups and
    the users tool keep working meanwhile; the next deploy writes it into .env.
    Generated secrets have no such default: they must be in .env."""
    environ = os.environ if environ is None else environ
    values = load(env_path)
    for setting in settings.SETTINGS:
        if setting.key not in values and not setting.generated:
            values[setting.key] = environ.get(setting.key, setting.default) if setting.from_shell else setting.default
    return check(values, env_path)
