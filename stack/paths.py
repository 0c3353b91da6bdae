"""Where things are, and how to call Compose on this stack."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / ".env.example"
DEFAULT_PROJECT = "mlflow-stack"


def env_path() -> Path:
    """STACK_ENV_FILE lets tests (or a second stack) use another .env."""
    return Path(os.environ.get("STACK_ENV_FILE", ROOT / ".env")).resolve()


def project_name() -> str:
    return os.environ.get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT


def compose_cmd() -> list[str]:
    return ["docker", "compose", "--project-directory", str(ROOT),
            "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_path()),
            "-p", project_name()]
