"""Read the upstream image pins from where they live.

Images of services are pinned as `${NAME_IMAGE:-image:tag}` defaults in
docker-compose.yml; the MLflow image's base is the `ARG MLFLOW_BASE_IMAGE=`
default in mlflow/Dockerfile (and MLFLOW_CONDA_BASE_IMAGE, the conda variant's).
Nothing else repeats them.

    python3 -m stack.pins       # prints "VARIABLE image" per pin
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_COMPOSE_PIN = re.compile(r"\$\{([A-Z][A-Z0-9_]*_IMAGE):-([^}]+)\}")
_DOCKERFILE_PIN = re.compile(r"^ARG (MLFLOW_BASE_IMAGE|MLFLOW_CONDA_BASE_IMAGE)=(\S+)$", re.M)


def image_pins(root: Path = ROOT) -> dict[str, str]:
    pins = dict(_COMPOSE_PIN.findall((root / "docker-compose.yml").read_text()))
    pins.update(_DOCKERFILE_PIN.findall((root / "mlflow" / "Dockerfile").read_text()))
    return pins


def main() -> int:
    for name, image in image_pins().items():
        print(name, image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
