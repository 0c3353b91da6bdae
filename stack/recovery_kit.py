"""What a restore onto a new machine needs and no backup holds: `.env` (the store keys,
the database passwords, MLFLOW_CRYPTO_KEK_PASSPHRASE that opens the AI gateway's stored
secrets) and the local CA's key (without it clients must be given a new CA).

`./show_all.sh --recovery-kit DIR` copies them into DIR, to be kept off this machine
(a password manager, a vault, an encrypted drive). The stack remembers a digest of what
the last kit held, and every deploy warns while there is no kit of the current files:
a disk that dies then takes the keys to every backup with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from . import common, paths, tls

RECORD = "recovery-kit.json"

README = """\
MLflow stack recovery kit: {project}, release {release}, made {made} UTC.

Keep this folder OFF the machine the stack runs on (a password manager, a vault, an
encrypted drive): it holds every secret of the stack. With the backups (the sets in
BACKUP_DIR, the point-in-time archive in PITR_BUCKET) it restores the stack onto a new
machine:

  1. Get the stack's project at release {release} (or later: read CHANGELOG.md).
  2. Copy env into the project as .env{certs_step}
  3. Follow docs/backups.md: "Restoring a set" for a logical set copied off the machine,
     "A lost machine" for the point-in-time archive (it starts with a NEW PITR_BUCKET in
     .env before the deploy: the old archive is only read).

Files: {files}.{elsewhere}
"""


class KitError(Exception):
    """The kit cannot be written where asked; the message says why."""


def sources(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> dict[str, Path]:
    """{name in the kit: file}: .env, and the local CA (key and certificate) when the stack made one."""
    found = {"env": paths.env_path(environ)}
    if not values.get("TLS_CERT_FILE"):
        out = tls.cert_dir(environ)
        for name in ("ca.key", "ca.crt"):
            if (out / name).exists():
                found[f"certs/{name}"] = out / name
    return found


def digest(files: Mapping[str, Path], key: str) -> str:
    """A keyed digest of the kit's files (keyed: the record on disk is no test of guesses)."""
    mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for name, path in sorted(files.items()):
        mac.update(f"{name}\0".encode() + path.read_bytes() + b"\0")
    return mac.hexdigest()


# Files of the user's own that .env names: a restore needs them too; the kit lists them.
NAMED_FILES = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "ALERT_SMTP_CA_FILE", "PROMETHEUS_ALERT_RULES")


def _private(path: Path, mode: int = 0o600) -> None:
    """Owner only, where the file system keeps modes (a FAT drive does not: said, not fatal)."""
    try:
        os.chmod(path, mode)
    except OSError as exc:
        print(f"warning: {path} could not be made private ({exc.strerror}): keep the drive itself private",
              file=sys.stderr)


def record_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    return paths.state_dir(environ) / RECORD


def write(values: Mapping[str, str], folder: Path, environ: Optional[Mapping[str, str]] = None) -> list[Path]:
    """Copy the kit into folder (made, mode 700; it must not exist or be empty: nothing
    is overwritten) and remember what it holds."""
    files = sources(values, environ)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise KitError(f"{folder} exists and is not an empty folder: name a new one (nothing was written)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(folder, 0o700)
    written = []
    for name, source in files.items():
        dest = folder / name
        dest.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(source, dest)
        _private(dest)
        written.append(dest)
    made = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    readme = folder / "README.txt"
    named = [f"{key}={values[key]}" for key in NAMED_FILES if values.get(key)]
    readme.write_text(README.format(
        project=paths.project_name(environ), release=common.stack_version(), made=made,
        certs_step=", and certs/ into the project's certs/ folder (clients keep trusting its CA)."
        if "certs/ca.key" in files else ".", files=", ".join(sorted(files)),
        elsewhere=("\nAlso needed, and not in this kit (files of your own that .env names): " + ", ".join(named) + "."
                   if named else "")))
    _private(readme)
    record = record_path(environ)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"digest": digest(files, values["MLFLOW_FLASK_SECRET_KEY"]), "made": made}) + "\n")
    return [*written, readme]


def status(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> tuple[bool, str]:
    """(current, what to say): whether the last kit holds the files as they are now."""
    try:
        record = json.loads(record_path(environ).read_text())
    except (OSError, ValueError):
        return False, "none made: ./show_all.sh --recovery-kit DIR, and keep DIR off this machine"
    if record.get("digest") != digest(sources(values, environ), values["MLFLOW_FLASK_SECRET_KEY"]):
        return False, (f"the one made {record.get('made', '?')} UTC is out of date (.env or the CA changed since): "
                       "./show_all.sh --recovery-kit NEW_DIR")
    return True, f"made {record.get('made', '?')} UTC, current"


def reminder(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> str:
    """The deploy's warning while no current kit exists, or ""."""
    current, said = status(values, environ)
    if current:
        return ""
    return ("WARNING: no copy of .env and the local CA's key is known to be kept off this machine (recovery kit: "
            f"{said}). Backups cannot be restored on a new machine without them: they hold the store keys and "
            "the passphrase of the secrets stored in the database.\n")
