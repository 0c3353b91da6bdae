"""Image builds: the whole output goes to a log file, a line per build step
to the terminal, and a failure ends with a summary that names the fix.

  summarize(log_text)   one or two lines: certificate trouble -> BUILD_CA_CERT,
                        no network -> which host, else the last error lines
  build_ca(environ)     the extra CA for image builds: BUILD_CA_CERT, else the
                        one this machine's pip is configured with
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, TextIO

from . import common, compose, paths

BUILD_CA_DEST = paths.ROOT / "mlflow" / "certs" / "build-ca.crt"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# BuildKit's plain progress prefixes each line with "#STEP SECONDS ".
_BUILDKIT_PREFIX = re.compile(r"^#\d+ \d+(\.\d+)? ")

_CERT = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|SSLError|certificate verify failed|SSL certificate problem|"
    r"server certificate verification failed|x509: certificate signed by unknown authority|"
    r"unable to get local issuer certificate|self[- ]signed certificate in certificate chain", re.I)
# Signs of a missing network, the most telling first (it becomes the reason given).
_NETWORK_SIGNS = ("Temporary failure in name resolution", "Temporary failure resolving", "Could not resolve host",
                  "Name or service not known", "No address associated with hostname", "Cannot connect to proxy",
                  "Network is unreachable", "No route to host", "Connection refused", "Connection timed out",
                  "Read timed out", "ProxyError", "Could not connect to", "Failed to establish a new connection")
_NETWORK = re.compile("|".join(re.escape(sign) for sign in _NETWORK_SIGNS), re.I)
_HOST = [
    re.compile(r"host='([^']+)'"),
    re.compile(r"Could not resolve host:? '?([A-Za-z0-9.-]+)"),
    re.compile(r"Temporary failure resolving '([^']+)'"),
    re.compile(r"Could not connect to ([A-Za-z0-9.-]+)"),
    re.compile(r"(?:Could not fetch URL|Failed to fetch|Get \"?)\s*[a-z+]+://([^/\s:'\"]+)"),
]
_ERROR_LINE = re.compile(r"\bERROR\b|\berror\b|^E: |\bError\b|\bfatal\b|\bfailed\b", re.I)
# Wrappers that only say that something failed, not what.
_GENERIC = re.compile(r"returned a non-zero code|failed to solve|did not complete successfully|"
                      r"failed to build|exit code: \d+|^Service \S+ Building", re.I)


class BuildError(Exception):
    """A build cannot start; the message says what to do."""


def clean(line: str) -> str:
    return _BUILDKIT_PREFIX.sub("", _ANSI.sub("", line)).rstrip()


def _hosts(lines: list[str]) -> list[str]:
    found: list[str] = []
    for line in lines:
        for pattern in _HOST:
            for host in pattern.findall(line):
                if host not in found:
                    found.append(host)
    return found


def summarize(log_text: str, system_ca: Optional[Path] = None, ca_in_use: Optional[Path] = None) -> list[str]:
    """Why a build failed, in one or two lines that say what to do."""
    lines = [clean(line) for line in log_text.splitlines()]
    lines = [line for line in lines if line.strip()]
    cert = [line for line in lines if _CERT.search(line)]
    if cert:
        hosts = _hosts(cert) or _hosts(lines)
        where = f" of {', '.join(hosts)}" if hosts else ""
        if ca_in_use:
            return [f"The build could not verify the TLS certificate{where}, even with the extra CA {ca_in_use}: "
                    "a proxy that intercepts TLS? Give the build that proxy's CA certificate:",
                    "  BUILD_CA_CERT=/path/to/proxy-ca.pem ./stack_deploy.sh"]
        if system_ca:
            return [f"The build could not verify the TLS certificate{where}: a proxy that intercepts TLS? "
                    "Give the build this machine's CA bundle (it trusts the proxy if this machine does), "
                    "or the proxy's CA certificate:",
                    f"  BUILD_CA_CERT={system_ca} ./stack_deploy.sh"]
        return [f"The build could not verify the TLS certificate{where}: a proxy that intercepts TLS? "
                "Give the build its CA certificate (PEM):",
                "  BUILD_CA_CERT=/path/to/proxy-ca.pem ./stack_deploy.sh"]
    network = [line for line in lines if _NETWORK.search(line)]
    if network:
        hosts = _hosts(network)
        if not hosts and any("/simple/" in line for line in network):
            hosts = ["the Python package index (pypi.org, or the one pip is set up for)"]
        text = "\n".join(network).lower()
        reason = next(sign for sign in _NETWORK_SIGNS if sign.lower() in text)
        target = ", ".join(hosts) if hosts else "the network"
        return [f"The build could not reach {target}: {reason}. Containers being built need that access: check "
                "DNS and the firewall, or give Docker your proxy (\"proxies\" in ~/.docker/config.json), then "
                "run ./stack_deploy.sh again."]
    errors = [line for line in lines if _ERROR_LINE.search(line) and not _GENERIC.search(line)]
    last = (errors or lines or ["(the build printed nothing)"])[-2:]
    return [line.strip()[:300] for line in last]


_STEP = [
    re.compile(r"^(Step \d+/\d+ : .*)"),        # the classic builder
    re.compile(r"^#(\d+) (\[[^\]]+\] .*)"),     # BuildKit, plain progress
]


def progress(line: str, seen: set[str]) -> Optional[str]:
    """The line to show for a build step (once per step), or None."""
    match = _STEP[0].match(line)
    if match:
        return match.group(1)
    match = _STEP[1].match(line)
    if match and match.group(1) not in seen:
        seen.add(match.group(1))
        return match.group(2)
    return None


def log_path(service: str, environ: Optional[Mapping[str, str]] = None) -> Path:
    return paths.state_dir(environ) / f"build-{service}.log"


def run(service: str, environ: Optional[Mapping[str, str]] = None, out: Optional[TextIO] = None,
        ca_in_use: Optional[Path] = None) -> int:
    """`docker compose build SERVICE`: output to its log file, a line per step to `out` (stderr)."""
    out = out or sys.stderr
    log = log_path(service, environ)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv, env = compose.invocation(environ)
    seen: set[str] = set()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen([*argv, "--progress", "plain", "build", service], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ANSI.sub("", raw.decode("utf-8", errors="replace"))
            fh.write(line)
            fh.flush()
            step = progress(line.rstrip(), seen)
            if step:
                print(f"    {step[:120]}", file=out, flush=True)
        status = proc.wait()
    if status == 0:
        print(f"    built; the log: {log}", file=out)
        return 0
    text = log.read_text(encoding="utf-8", errors="replace")
    tail = [clean(line) for line in text.splitlines() if line.strip()][-10:]
    print("    --- last lines of the build log ---", file=out)
    for line in tail:
        print(f"    {line[:300]}", file=out)
    print(f"error: building the {service} image failed; the whole log: {log}", file=out)
    for line in summarize(text, common.system_ca_bundle(), ca_in_use):
        print(line, file=out)
    return status or 1


# --- The extra CA for image builds -------------------------------------------

_PIP_CERT = re.compile(r"^(?:global|install|:env:)\.cert='?([^']+)'?$")


def _pip_config(run_cmd: Callable[..., subprocess.CompletedProcess]) -> str:
    try:
        result = run_cmd([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def host_pip_ca(environ: Mapping[str, str],
                run_cmd: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[tuple[Path, str]]:
    """The CA bundle this machine's pip is configured with, and where that was found."""
    candidates = [(environ.get("PIP_CERT", ""), "PIP_CERT")]
    for line in _pip_config(run_cmd).splitlines():
        match = _PIP_CERT.match(line.strip())
        if match:
            candidates.append((match.group(1), "pip config " + line.split("=", 1)[0]))
    candidates.append((environ.get("REQUESTS_CA_BUNDLE", ""), "REQUESTS_CA_BUNDLE"))
    for value, source in candidates:
        if value and Path(value).is_file() and os.access(value, os.R_OK):
            return Path(value), source
    return None


def build_ca(environ: Mapping[str, str],
             run_cmd: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[Optional[Path], str]:
    """(the extra CA for image builds or None, a note for the user)."""
    explicit = environ.get("BUILD_CA_CERT", "")
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.R_OK)):
            raise BuildError(f"BUILD_CA_CERT={explicit} cannot be read: point it at a CA certificate (PEM), "
                             "or unset it")
        return Path(explicit), ""
    found = host_pip_ca(environ, run_cmd)
    if found:
        path, source = found
        return path, (f"BUILD_CA_CERT is not set: the build trusts the CA bundle this machine's pip uses "
                      f"({source}={path}); set BUILD_CA_CERT to choose another")
    return None, ""


def install_ca(path: Path, dest: Path = BUILD_CA_DEST) -> None:
    """Copy the CA where mlflow/Dockerfile takes it from; unchanged files keep the build cache."""
    if dest.exists() and dest.read_bytes() == path.read_bytes():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
