"""Checks before a deploy: Docker and Compose versions, free ports, free disk.

Each failed check says what is wrong and what to do about it. Ports held by
this stack's own running nginx are fine: re-deploying a running stack is a
normal, no-change operation.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import compose, paths

MIN_ENGINE = (20, 10)
# Secrets sourced from environment variables need Compose 2.23.1 or later.
MIN_COMPOSE = (2, 24)
MIN_FREE_GIB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric part of a version: '20.10.24+dfsg1' -> (20, 10, 24)."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", text.strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def check_docker() -> list[Check]:
    if shutil.which("docker") is None:
        return [Check("docker", False, "the docker CLI is not installed: install Docker Engine "
                      f"{'.'.join(map(str, MIN_ENGINE))} or later (https://docs.docker.com/engine/install/)")]
    server = _run(["docker", "version", "--format", "{{.Server.Version}}"])
    if server.returncode != 0 or not server.stdout.strip():
        return [Check("docker", False, "the Docker engine is not reachable: start it (e.g. "
                      "'sudo systemctl start docker') and check that your user may use it "
                      f"({(server.stderr or '').strip().splitlines()[-1:] or ''})")]
    checks = []
    engine = server.stdout.strip()
    checks.append(Check("docker engine", version_tuple(engine) >= MIN_ENGINE,
                        f"{engine}" + ("" if version_tuple(engine) >= MIN_ENGINE else
                                       f": upgrade to {'.'.join(map(str, MIN_ENGINE))} or later")))
    compose = _run(["docker", "compose", "version", "--short"])
    if compose.returncode != 0:
        checks.append(Check("docker compose", False, "the Compose plugin is missing: install "
                            "docker-compose-plugin (or the Compose CLI as ~/.docker/cli-plugins/docker-compose)"))
    else:
        version = compose.stdout.strip()
        ok = version_tuple(version) >= MIN_COMPOSE
        checks.append(Check("docker compose", ok, version + ("" if ok else
                            f": upgrade to {'.'.join(map(str, MIN_COMPOSE))} or later")))
    return checks


def stack_published_ports() -> set[int]:
    """Ports already published by this stack's own containers."""
    argv, env = compose.invocation()
    try:
        result = subprocess.run([*argv, "ps", "--format", "json"], capture_output=True, text=True,
                                timeout=60, check=False, env=env)
    except subprocess.TimeoutExpired:
        return set()
    ports: set[int] = set()
    if result.returncode != 0:
        return ports
    for line in result.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entries = json.loads(line)
        except json.JSONDecodeError:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            for pub in entry.get("Publishers") or []:
                if pub.get("PublishedPort"):
                    ports.add(int(pub["PublishedPort"]))
    return ports


def port_free(address: str, port: int) -> tuple[bool, str]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False, "in use"
            if exc.errno == errno.EACCES:
                # Privileged port for this user; Docker binds it, not us.
                return True, "privileged (Docker will bind it)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return False, f"{address} is not an address of this machine"
            return False, exc.strerror or str(exc)
    return True, "free"


def check_ports(values: dict[str, str]) -> list[Check]:
    address = values["BIND_ADDRESS"]
    ours = stack_published_ports()
    checks = []
    for key in ("HTTPS_PORT", "HTTP_PORT", "S3_PORT"):
        if key not in values:
            continue
        port = int(values[key])
        if port in ours:
            checks.append(Check(f"port {port} ({key})", True, "held by this stack's nginx"))
            continue
        ok, why = port_free(address, port)
        detail = why if ok else (f"{address}:{port} is {why}: set another {key} in .env, or stop "
                                 f"what holds it (find it with: ss -ltnp 'sport = :{port}')")
        checks.append(Check(f"port {port} ({key})", ok, detail))
    return checks


def free_gib(path: Path) -> float:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / 2**30


def check_disk() -> list[Check]:
    checks = []
    root = _run(["docker", "info", "--format", "{{.DockerRootDir}}"]).stdout.strip()
    places = [("project folder", paths.ROOT)]
    if root and Path(root).exists():
        places.append(("Docker data", Path(root)))
    for label, place in places:
        gib = free_gib(place)
        ok = gib >= MIN_FREE_GIB
        checks.append(Check(f"disk ({label})", ok, f"{gib:.1f} GiB free at {place}" + (
            "" if ok else f": free at least {MIN_FREE_GIB:.0f} GiB (e.g. 'docker system prune')")))
    return checks


def run(values: dict[str, str]) -> list[Check]:
    checks = check_docker()
    if all(c.ok for c in checks):
        checks += check_ports(values)
        checks += check_disk()
    return checks
