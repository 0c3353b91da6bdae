"""Offline stand-ins for upstream images that no registry can provide here.

`./stack_deploy.sh --standins` sets STACK_STANDINS=true in .env. A deploy then
runs tests/standin-images.sh (it builds a stand-in only for an image that is
neither on this machine nor pullable, and uses the real image wherever it can)
and records the stand-ins it used in the stack's state folder. Every later
Compose call of the scripts (show, remove, backups, re-deploys) takes them from
that record, so the stack keeps running on the images it was deployed with.

An image set in the shell or in .env (e.g. POSTGRES_IMAGE) always wins over a
stand-in. Stand-ins are for trying the stack out and for tests, not production:
the deploy says so loudly, at its start and again at its end.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Mapping, Optional

from . import paths, pins

SCRIPT = paths.ROOT / "tests" / "standin-images.sh"
_EXPORT = re.compile(r"^export ([A-Z][A-Z0-9_]*_IMAGE)=(.+)$")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")


class StandinError(Exception):
    """Building the stand-ins failed; the message says what to do."""


def enabled(values: Mapping[str, str]) -> bool:
    return values.get("STACK_STANDINS") == "true"


@functools.lru_cache(maxsize=1)
def available_for() -> frozenset[str]:
    """The image variables tests/standin-images.sh can stand in for (it is their one home)."""
    if not SCRIPT.exists():
        return frozenset()
    result = subprocess.run([str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60, check=False)
    return frozenset(result.stdout.split()) if result.returncode == 0 else frozenset()


def parse_exports(text: str) -> dict[str, str]:
    """`export NAME=image` lines (as tests/standin-images.sh prints them) -> {NAME: image}."""
    images = {}
    for line in text.splitlines():
        match = _EXPORT.match(line.strip())
        if match:
            words = shlex.split(match.group(2))
            if len(words) == 1 and _IMAGE.fullmatch(words[0]):
                images[match.group(1)] = words[0]
    return images


def record_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    return paths.state_dir(environ) / "standins.env"


def read_record(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    path = record_path(environ)
    return parse_exports(path.read_text()) if path.exists() else {}


def write_record(images: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> None:
    path = record_path(environ)
    if not images:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Stand-in images this stack was deployed with (./stack_deploy.sh --standins).\n" + "".join(
        f"export {var}={shlex.quote(image)}\n" for var, image in sorted(images.items()))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def in_use(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The recorded stand-ins that apply: STACK_STANDINS=true, and no other image
    set for it in the shell or .env (the scripts' own export of the stand-in is
    not another). The python stand-in is no base for the conda variant."""
    environ = os.environ if environ is None else environ
    if not enabled(values):
        return {}
    conda = values.get("MLFLOW_VARIANT") == "conda"
    return {var: image for var, image in read_record(environ).items()
            if (environ.get(var) or values.get(var) or image) == image
            and not (conda and var == "MLFLOW_BASE_IMAGE")}


def build(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Run tests/standin-images.sh (its progress goes to stderr), record what it
    made, and return the stand-ins this stack uses."""
    environ = os.environ if environ is None else environ
    try:
        result = subprocess.run([str(SCRIPT)], stdout=subprocess.PIPE, text=True, timeout=3600,
                                check=False, env=dict(environ))
    except subprocess.TimeoutExpired:
        raise StandinError("building the stand-in images took over an hour; see the lines above") from None
    if result.returncode != 0:
        raise StandinError("building the stand-in images failed (the lines above say why; it needs "
                           "debootstrap, root, and a reachable Debian mirror). Fix that and run "
                           "./stack_deploy.sh again, or make a container registry or mirror reachable")
    write_record(parse_exports(result.stdout), environ)
    return in_use(values, environ)


def banner(used: Mapping[str, str], values: Mapping[str, str],
           environ: Optional[Mapping[str, str]] = None, final: bool = False) -> str:
    """The loud notice on stderr: which images are stand-ins, and what they are for."""
    environ = os.environ if environ is None else environ
    pinned = {u.var: u.pin for u in pins.upstream_images(values, environ)}
    rule = "#" * 78
    lines = [rule, "#  STAND-IN IMAGES IN USE: for trying out and testing only, NOT for production",
             rule]
    width = max(len(pinned.get(var, var)) for var in used)
    for var, image in sorted(used.items()):
        lines.append(f"#  {pinned.get(var, var):<{width}}  replaced by  {image}")
    if not final:
        lines += ["#",
                  "#  No container registry could provide these images, so they were built here",
                  "#  from Debian packages (tests/standin-images.sh). They behave like the upstream",
                  "#  images for this stack, but they are not those images: no upstream releases,",
                  "#  security fixes or support."]
    lines += ["#  Remembered in .env as STACK_STANDINS=true. For production: make a registry or",
              "#  mirror reachable, set STACK_STANDINS=false and run ./stack_deploy.sh again.",
              rule]
    return "\n".join(lines) + "\n"
