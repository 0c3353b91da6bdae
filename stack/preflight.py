"""Checks before a deploy: Docker and Compose versions, free ports, free disk,
and the upstream images (on this machine, or pullable, or replaced by a stand-in).

Each failed check says what is wrong and what to do about it. Ports held by
this stack's own running nginx are fine: re-deploying a running stack is a
normal, no-change operation.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from . import alerts, compose, paths, pins, settings, standins

MIN_ENGINE = (20, 10)
# Secrets sourced from environment variables need Compose 2.23.1 or later.
MIN_COMPOSE = (2, 24)
MIN_FREE_GIB = 5.0
# How long a registry may take to answer for an image before it counts as unreachable.
PULL_ANSWER_SECONDS = 45


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    # What to do, when a failure needs more than its detail says (printed once, last).
    fix: str = ""


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


def image_present(image: str) -> bool:
    return _run(["docker", "image", "inspect", "--format", "{{.Id}}", image]).returncode == 0


# `docker pull` prints these once the registry has answered with the image's manifest.
_ANSWERED = re.compile(r"Pulling from |Pulling fs layer|Already exists|Digest: sha256:|Status: ")


def pull_probe(image: str, timeout: float = PULL_ANSWER_SECONDS) -> tuple[bool, str]:
    """(pullable, why not): whether the engine can pull IMAGE, through its own
    mirrors and proxy, without downloading it: `docker pull` is stopped as soon
    as the registry has answered, or after `timeout` seconds without an answer."""
    proc = subprocess.Popen(["docker", "pull", image], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    output = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, f"no answer from the registry within {timeout:.0f} s"
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            if _ANSWERED.search(output.decode(errors="replace")):
                return True, ""
        proc.wait()
        return (True, "") if proc.returncode == 0 else (False, pull_error(output.decode(errors="replace")))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pull_error(text: str) -> str:
    """Docker's pull error in a few words: what could not be reached, or what the registry said."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "docker pull failed"
    last = re.sub(r"^Error response from daemon:\s*", "", last)
    patterns = [
        (r"lookup (\S+?)(?: on \S+)?: no such host", "no DNS answer for {0}"),
        (r"lookup (\S+?)(?: on \S+)?: (.*)", "cannot resolve {0}: {1}"),
        (r'Get "?https?://([^/"]+)[^:]*:.*(i/o timeout|connection refused|network is unreachable|'
         r"no route to host|TLS handshake timeout|certificate signed by unknown authority)",
         "{0}: {1}"),
        (r"(pull access denied|manifest unknown|not found: manifest unknown|repository does not exist)",
         "the registry has no such image, or refuses it: {0}; check the name, or docker login"),
        (r"(toomanyrequests.*)", "the registry refuses for now: {0}"),
    ]
    for regex, template in patterns:
        match = re.search(regex, last, re.I)
        if match:
            return template.format(*match.groups())
    return last[:200]


def check_images(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> list[Check]:
    """Every upstream image must be on this machine or pullable, or (with
    STACK_STANDINS=true) have an offline stand-in. Only missing images are
    probed, all at once, each for at most PULL_ANSWER_SECONDS."""
    environ = os.environ if environ is None else environ
    wanted = pins.upstream_images(values, environ)
    missing = sorted({u.image for u in wanted if not image_present(u.image)})
    with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
        probes = dict(zip(missing, pool.map(pull_probe, missing)))
    use_standins = standins.enabled(values)
    checks: list[Check] = []
    no_registry: list[pins.Upstream] = []
    for u in wanted:
        name = f"image {u.label}"
        if u.image not in probes:
            checks.append(Check(name, True, f"{u.image}: on this machine"))
            continue
        pullable, why = probes[u.image]
        if pullable:
            checks.append(Check(name, True, f"{u.image}: pullable"))
        elif use_standins and not u.overridden and u.var in standins.available_for() \
                and u.pin == pins.image_pins().get(u.var):
            checks.append(Check(name, True, f"{u.image} cannot be pulled ({why}): an offline stand-in "
                                            "replaces it (for trying out and tests, not production)"))
        elif u.overridden:
            checks.append(Check(name, False, f"{u.var}={u.image} (set by you) is not on this machine and "
                                             f"cannot be pulled: {why}",
                                fix=f"{u.var}={u.image}: load it (docker load), correct the name, or unset "
                                    f"{u.var} (in the shell or .env) to use the pinned {u.pin}."))
        elif use_standins:
            checks.append(Check(name, False, f"{u.image} is not on this machine and cannot be pulled: {why}",
                                fix=f"{u.image} has no offline stand-in (the conda variant needs conda-forge's "
                                    "image and channel): make a registry or mirror reachable, or deploy the "
                                    "pip variant (--variant pip)."))
        else:
            checks.append(Check(name, False, f"{u.image} is not on this machine and cannot be pulled: {why}"))
            no_registry.append(u)
    if no_registry:
        fix = (f"No registry can provide {', '.join(u.image for u in no_registry)}.\n"
               "  To try the stack out anyway:  ./stack_deploy.sh --standins\n"
               "    (builds offline stand-ins here: for trying out and testing, NOT for production)\n"
               "  For production: make a registry or mirror reachable (e.g. \"registry-mirrors\" in "
               "/etc/docker/daemon.json, or a proxy for dockerd), or docker load the images; then run "
               "./stack_deploy.sh again.")
        for check in checks:
            if not check.ok and not check.fix:
                check.fix = fix
    return checks


def run(values: Mapping[str, str], environ: Optional[Mapping[str, str]] = None, swarm: bool = False) -> list[Check]:
    checks = check_docker()
    if all(c.ok for c in checks):
        # On a swarm, nginx publishes its ports on every node: not this machine's alone to check.
        checks += [] if swarm else check_ports(values)
        checks += check_disk()
        checks += check_images(values, environ)
    checks += check_alert_rules(values)
    checks += check_smtp_ca(values)
    checks += check_hooks()
    return checks


# Start-up hooks the images run only when they are executable (a copy of the project
# made without modes, from a zip say, loses the bit; nginx would then stop at start).
HOOKS = (paths.ROOT / "nginx" / "15-stack-token.sh",)


def check_hooks(hooks=HOOKS) -> list[Check]:
    lost = [h for h in hooks if not os.access(h, os.X_OK)]
    if not lost:
        return []
    names = " ".join(str(h.relative_to(paths.ROOT)) if h.is_relative_to(paths.ROOT) else str(h) for h in lost)
    return [Check("start-up hooks", False, f"{names} is not executable", f"run: chmod +x {names}")]


def check_alert_rules(values: Mapping[str, str]) -> list[Check]:
    """PROMETHEUS_ALERT_RULES must be a file (Compose would make a missing one a directory)."""
    if not values.get("PROMETHEUS_ALERT_RULES") or not settings.profile_on(values, "monitoring"):
        return []
    path = compose.alert_rules(values)
    ok = path.is_file()
    return [Check("alert rules", ok, str(path) if ok else f"{path} is not a file",
                  "" if ok else "set PROMETHEUS_ALERT_RULES in .env to a Prometheus rules file, or empty it")]


def check_smtp_ca(values: Mapping[str, str]) -> list[Check]:
    """ALERT_SMTP_CA_FILE must be a PEM certificate (a missing file would be mounted as a directory)."""
    if not values.get("ALERT_SMTP_CA_FILE") or not settings.profile_on(values, "monitoring"):
        return []
    path = alerts.smtp_ca(values)
    ok = path.is_file() and _run(["openssl", "x509", "-noout", "-in", str(path)]).returncode == 0
    return [Check("mail server's CA", ok, str(path) if ok else f"{path} is not a PEM certificate",
                  "" if ok else "set ALERT_SMTP_CA_FILE in .env to the CA certificate (PEM) that issued the mail "
                                "server's certificate, or empty it for the system's CAs")]
