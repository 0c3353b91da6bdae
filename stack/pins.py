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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import settings

ROOT = Path(__file__).resolve().parent.parent
_COMPOSE_PIN = re.compile(r"\$\{([A-Z][A-Z0-9_]*_IMAGE):-([^}]+)\}")
_DOCKERFILE_PIN = re.compile(r"^ARG (MLFLOW_BASE_IMAGE|MLFLOW_CONDA_BASE_IMAGE)=(\S+)$", re.M)


def service_pins(root: Path = ROOT) -> dict[str, str]:
    """The images Compose pulls for services (VARIABLE -> image)."""
    return dict(_COMPOSE_PIN.findall((root / "docker-compose.yml").read_text()))


_SERVICE = re.compile(r"^  ([a-z][a-z0-9-]*):\s*$")
_PROFILES = re.compile(r"^    profiles:\s*\[([^\]]*)\]")


def _service_blocks(root: Path) -> dict[str, tuple[set[str], set[str]]]:
    """service -> (image pin variables, Compose profiles) from docker-compose.yml."""
    services: dict[str, tuple[set[str], set[str]]] = {}
    current = None
    for line in (root / "docker-compose.yml").read_text().splitlines():
        if re.match(r"^\S", line):
            current = "" if line.startswith("services:") else None
            continue
        if current is None:
            continue
        if m := _SERVICE.match(line):
            current = m.group(1)
            services[current] = (set(), set())
        elif current:
            services[current][0].update(var for var, _ in _COMPOSE_PIN.findall(line))
            if m := _PROFILES.match(line):
                services[current][1].update(p.strip() for p in m.group(1).split(",") if p.strip())
    return services


def inactive_services(active: set[str], root: Path = ROOT) -> list[str]:
    """Services that only run under profiles that are not active."""
    return sorted(name for name, (_, profiles) in _service_blocks(root).items()
                  if profiles and not profiles & active)


def pin_profiles(root: Path = ROOT) -> dict[str, set[str]]:
    """VARIABLE -> the Compose profiles of the services using that pin (empty: always on)."""
    found: dict[str, set[str]] = {}
    for pins, profiles in _service_blocks(root).values():
        for var in pins:
            # A pin used by an always-on service is always needed.
            found[var] = set() if (var in found and not found[var]) or not profiles else found.get(var, set()) | profiles
    return found


def image_pins(root: Path = ROOT) -> dict[str, str]:
    pins = service_pins(root)
    pins.update(_DOCKERFILE_PIN.findall((root / "mlflow" / "Dockerfile").read_text()))
    return pins


@dataclass(frozen=True)
class Upstream:
    """An image the stack takes from a registry (or from this machine)."""

    var: str          # the variable that overrides it, e.g. POSTGRES_IMAGE
    image: str        # what this deploy uses
    pin: str          # the pinned image it is, unless overridden
    overridden: bool  # set in the shell or in .env
    base: bool        # the MLflow image's build base (not a service image)

    @property
    def label(self) -> str:
        return f"{self.var} (the MLflow image's base)" if self.base else self.var


def upstream_images(values: Mapping[str, str], environ: Mapping[str, str], root: Path = ROOT) -> list[Upstream]:
    """The images a deploy pulls (services) or builds on (the MLflow base), each
    as this deploy resolves it: the shell's or .env's override, else the pin.
    The mlflow and backup images are built here, not pulled; the backup image's
    base is the PostgreSQL image."""
    pins = image_pins(root)
    base_pin = pins["MLFLOW_CONDA_BASE_IMAGE" if values.get("MLFLOW_VARIANT") == "conda" else "MLFLOW_BASE_IMAGE"]
    active = set(filter(None, settings.compose_profiles(values).split(",")))
    needed = pin_profiles(root)
    # Images of services whose profile is off are neither pulled nor checked.
    wanted = [(var, pin, False) for var, pin in service_pins(root).items()
              if not needed.get(var) or needed[var] & active]
    wanted.append(("MLFLOW_BASE_IMAGE", base_pin, True))
    result = []
    for var, pin, base in wanted:
        override = environ.get(var) or values.get(var) or ""
        result.append(Upstream(var, override or pin, pin, bool(override), base))
    return result


def main() -> int:
    for name, image in image_pins().items():
        print(name, image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
