"""Where things are, and the one Compose command line for this stack."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Over COMPOSE_FILE for one-off jobs on the swarm stack's network.
SWARM_ONE_OFF_FILE = ROOT / "stack" / "swarm-one-off.yml"


def _environ(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def env_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    """STACK_ENV_FILE lets tests (or a second stack) use another .env."""
    return Path(_environ(environ).get("STACK_ENV_FILE", ROOT / ".env")).resolve()


def default_project() -> str:
    """The compose file's own `name:`, so `docker compose` by hand agrees with the scripts."""
    match = re.search(r"^name:\s*(\S+)\s*$", COMPOSE_FILE.read_text(), re.M)
    if not match:
        raise RuntimeError(f"{COMPOSE_FILE} has no top-level name:")
    return match.group(1)


def project_name(environ: Optional[Mapping[str, str]] = None) -> str:
    return _environ(environ).get("COMPOSE_PROJECT_NAME") or default_project()


def compose_cmd(environ: Optional[Mapping[str, str]] = None, on_swarm: bool = False) -> list[str]:
    files = ["-f", str(COMPOSE_FILE)] + (["-f", str(SWARM_ONE_OFF_FILE)] if on_swarm else [])
    return ["docker", "compose", "--project-directory", str(ROOT), *files,
            "--env-file", str(env_path(environ)), "-p", project_name(environ)]


def state_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """What the scripts keep about a stack that is neither a setting nor a secret
    (build logs, the stand-in images it uses): .stack-state/<project>/ beside .env."""
    return env_path(environ).parent / ".stack-state" / project_name(environ)


def backup_dir(values: Mapping[str, str]) -> Path:
    """BACKUP_DIR, relative to the project's folder unless absolute."""
    path = Path(values["BACKUP_DIR"]).expanduser()
    return path if path.is_absolute() else (ROOT / path).resolve()
