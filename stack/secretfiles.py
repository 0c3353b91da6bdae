"""Secrets as files for Compose: each setting with a `file` (stack/settings.py)
rendered into its own file.

Compose can only give read-only containers secrets from files. .env stays the
one place a secret is kept; these files are a copy made at each deploy, in a
folder only the owner can enter (0700). The files themselves are 0644 because
Compose bind-mounts them as they are and the services read them as their own
non-root users; the folder is what keeps other users of the host out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from . import paths, settings

FILES = {s.file: s.key for s in settings.SETTINGS if s.file}


def secrets_dir(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    default = paths.env_path(environ).parent / ".stack-secrets" / paths.project_name(environ)
    return Path(environ.get("STACK_SECRETS_DIR", default)).resolve()


def write(values: dict[str, str], folder: Path | None = None) -> Path:
    folder = folder or secrets_dir()
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder.parent, 0o700)
    os.chmod(folder, 0o700)
    for name, key in FILES.items():
        path = folder / name
        value = values[key]
        if path.exists() and path.read_text() == value:
            continue
        tmp = folder / f".{name}.tmp"
        tmp.write_text(value)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return folder


def digest(values: dict[str, str], names=None) -> str:
    """A keyed digest of every secret file's content, given as a label to the long-running
    services that read them at start: a changed secret (a new nginx token, say) recreates
    them at the next deploy, where Compose sees only the same files mounted (names: only
    those files' secrets). Keyed with
    the UI's signing key, so the label is no test of guesses."""
    mac = hmac.new(values["MLFLOW_FLASK_SECRET_KEY"].encode(), digestmod=hashlib.sha256)
    for name, key in sorted(FILES.items()):
        if names is not None and name not in names:
            continue
        mac.update(f"{name}\0{values[key]}\0".encode())
    return mac.hexdigest()[:16]
