"""The end-to-end fixture: the shipped stack, deployed for real by its own script.

A separate Compose project name, ports on 127.0.0.1 only, stand-ins for the
images that cannot be pulled (tests/standin-images.sh), and on the way out the
logs (when anything failed) and `./stack_remove.sh --purge --yes` always.
Docker is required: without it these tests fail, they are never skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stack import compose, envfile, paths

ROOT = paths.ROOT
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
_failures: list[str] = []


# Runs after every other module of its process: it makes this machine's engine a swarm
# manager and then leaves the swarm, and leaving broke name resolution inside the Compose
# stacks still running on Debian's 20.10 engine ("could not translate host name db", seen
# in CI: every later module that used the shared stack failed). tests/run.sh, with other
# processes side by side, has it stay a manager and leaves once they are all done.
LAST_MODULE = "test_swarm.py"


# First: the markers select what runs (-m) after this.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    # Unit tests first (quick feedback); otherwise the order pytest collected.
    # Every e2e module sets up the data it checks, so any module order works, but
    # the swarm module goes last (LAST_MODULE).
    items.sort(key=lambda item: (Path(str(item.fspath)).parent.name != "unit",
                                 Path(str(item.fspath)).name == LAST_MODULE))
    for item in items:
        if Path(str(item.fspath)).parent.name == "e2e":
            item.add_marker(pytest.mark.e2e)


FIGURES = ROOT / ".cache" / "test-figures.txt"


def show(text: str) -> None:
    """A figure or finding for the run's output, printed together at its end (under
    "figures"), where it is not lost among the progress of tests run side by side."""
    FIGURES.parent.mkdir(exist_ok=True)
    with open(FIGURES, "a") as fh:
        fh.write(text.strip("\n") + "\n\n")


def _interrupted(signum, _frame):
    # tests/run.sh ends its background lane with SIGTERM (SIGINT is ignored there): as a
    # KeyboardInterrupt, the fixtures still remove their stacks.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session):
    signal.signal(signal.SIGTERM, _interrupted)
    # tests/run.sh runs parts of the suite side by side and prints the figures itself.
    if not os.environ.get("STACK_TEST_PART"):
        FIGURES.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    if FIGURES.exists() and not os.environ.get("STACK_TEST_PART"):
        terminalreporter.section("figures")
        terminalreporter.write(FIGURES.read_text())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _failures.append(item.nodeid)


# The shared deployments (session fixtures) are removed once the module of the last test that
# uses them is done (its module fixtures may still redeploy them in their teardown), not at the
# session's end: the modules after it (the swarm's, last in its lane) then run without two idle
# stacks beside them. Modules that bring their own `stack` do not count.
SHARED = ("stack", "prefixed_stack")
_last_module: dict[str, str] = {}
_removers: dict[str, object] = {}


def pytest_collection_finish(session):
    for item in session.items:  # the final selection, in the order it runs
        info = getattr(item, "_fixtureinfo", None)
        names = set(getattr(item, "fixturenames", ()))
        if "target" in names:  # asks for either deployment at run time
            names |= set(SHARED)
        for name in SHARED:
            defs = info.name2fixturedefs.get(name, ()) if info else ()
            if name in names and (not defs or defs[-1].func.__module__ == __name__):
                _last_module[name] = str(item.path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    outcome = yield
    if outcome.excinfo is not None:  # a module fixture's teardown failed: the stack's logs are wanted
        _failures.append(item.nodeid)
    if nextitem is not None and nextitem.path == item.path:
        return  # the module's fixtures are still up
    for name, module in _last_module.items():
        if module == str(item.path) and name in _removers:
            _removers.pop(name)()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0, detail=None):
    """Poll predicate() until it returns something truthy (returned) or timeout s pass
    (AssertionError naming what, with detail() or the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            last = detail() if detail else value
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def assert_acknowledged_stored(threads: list[dict], psql, s3, bucket: str) -> None:
    """Every metric step and artifact that replica_client.py threads saw acknowledged is
    stored: rows in PostgreSQL (psql: SQL -> output) and objects in the bucket (s3: a client)."""
    for t in threads:
        stored = {int(float(s)) for s in psql(
            f"SELECT step FROM metrics WHERE run_uuid = '{t['run_id']}' AND key = 'm'").split()}
        missing = set(t["steps"]) - stored
        assert not missing, (t["run_id"], sorted(missing)[:20])
        prefix = "artifacts/" + t["artifact_uri"].split("mlflow-artifacts:", 1)[1].strip("/") + "/"
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        names = {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}
        assert set(t["artifacts"]) <= names, sorted(set(t["artifacts"]) - names)[:20]


# Inside a server container: its workers' metrics, with Prometheus's bearer token (the port
# answers nobody else).
_SERVER_METRICS = ("import os, urllib.request;"
                   "token = open('/run/secrets/stack_metrics_token').read().strip();"
                   "ask = urllib.request.Request('http://127.0.0.1:' + os.environ['MLFLOW_METRICS_PORT'] + '/metrics',"
                   " headers={'Authorization': 'Bearer ' + token});"
                   "print(urllib.request.urlopen(ask, timeout=10).read().decode())")


def server_metrics(stack, index: int | None = None) -> str:
    """The Prometheus text of one server replica (the first, or --index INDEX)."""
    where = ("--index", str(index)) if index is not None else ()
    return stack.compose("exec", "-T", *where, "mlflow", "python3", "-c", _SERVER_METRICS).stdout


def streamed_from_the_store(response) -> bool:
    """Whether nginx fetched the answer from the store (which names every request it
    serves) rather than MLflow answering itself."""
    return "x-amz-request-id" in response.headers  # requests' headers ignore case


def parse_exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return values


@dataclass
class Stack:
    environ: dict[str, str]
    workdir: Path
    client_env: dict[str, str] = field(default_factory=dict)
    deploy_output: str = ""

    @property
    def env_file(self) -> Path:
        return Path(self.environ["STACK_ENV_FILE"])

    @property
    def project(self) -> str:
        return self.environ["COMPOSE_PROJECT_NAME"]

    def values(self) -> dict[str, str]:
        return envfile.effective(envfile.parse(self.env_file.read_text()), self.environ)

    @property
    def origin(self) -> str:
        """What a browser sends as Origin: scheme, host and port, never a path."""
        return f"https://localhost:{self.values()['HTTPS_PORT']}"

    @property
    def base_url(self) -> str:
        values = self.values()
        return f"https://localhost:{values['HTTPS_PORT']}{values['MLFLOW_BASE_PATH']}"

    @property
    def ca_bundle(self) -> str:
        return self.client_env["REQUESTS_CA_BUNDLE"]

    def http(self, method: str, path: str, *, auth=None, base=None, **kw):
        """A request as a browser or script would send it (requests, TLS verified)."""
        import requests

        values = self.values()
        if auth is None:
            auth = (values["MLFLOW_ADMIN_USERNAME"], values["MLFLOW_ADMIN_PASSWORD"])
        elif auth is False:
            auth = None
        kw.setdefault("timeout", 60)
        kw.setdefault("allow_redirects", False)
        return requests.request(method, (base or self.base_url) + path, auth=auth, verify=self.ca_bundle, **kw)

    def script(self, name: str, *args: str, check: bool = True, timeout: int = 1500,
               extra: dict | None = None) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run([str(ROOT / name), *args], capture_output=True, text=True,
                                env={**self.environ, **(extra or {})}, stdin=subprocess.DEVNULL,
                                timeout=timeout, check=False)
        print(f"{name} {' '.join(args)}: exit {result.returncode} in {time.monotonic() - started:.0f} s")
        if check and result.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} exited {result.returncode}\n"
                                 f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-8000:]}")
        return result

    def deploy(self, extra: dict | None = None) -> subprocess.CompletedProcess:
        result = self.script("stack_deploy.sh", "--yes", extra=extra)
        self.deploy_output = result.stdout + result.stderr
        self.refresh_client_env(result.stdout)
        return result

    def refresh_client_env(self, printed: str) -> None:
        """The client settings a deploy printed; a re-deploy leaves out the admin's password,
        which ./show_all.sh --client-env gives on request."""
        self.client_env = parse_exports(printed)
        if "MLFLOW_TRACKING_USERNAME" in self.client_env and "MLFLOW_TRACKING_PASSWORD" not in self.client_env:
            asked = parse_exports(self.script("show_all.sh", "--client-env").stdout)
            self.client_env["MLFLOW_TRACKING_PASSWORD"] = asked["MLFLOW_TRACKING_PASSWORD"]

    def compose(self, *args: str, check: bool = True, stdin: str | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess:
        argv, environ = compose.invocation(self.environ)
        result = subprocess.run([*argv, *args], capture_output=True, text=True, env=environ,
                                input=stdin, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.stderr[-4000:]}")
        return result

    def psql(self, sql: str, db_suffix: str = "") -> str:
        """SQL as the superuser, in MLflow's database (db_suffix "_auth": the users' database)."""
        values = self.values()
        return self.compose("exec", "-T", "db", "psql", "-U", values["POSTGRES_USER"], "-d",
                            values["POSTGRES_DB"] + db_suffix, "-Atc", sql).stdout.strip()

    def client_environ(self, extra: dict | None = None) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "AWS_", "STACK_", "COMPOSE_"))}
        return {**base, **self.client_env, "MLFLOW_DISABLE_TELEMETRY": "true", **(extra or {})}

    def client(self, *args: str, extra: dict | None = None, timeout: int = 1200,
               script: str = "remote_client.py", check: bool = True) -> subprocess.CompletedProcess:
        """A remote client, in its own process, with only the printed settings."""
        result = subprocess.run([sys.executable, str(Path(__file__).parent / script), *args],
                                capture_output=True, text=True, env=self.client_environ(extra),
                                timeout=timeout, check=False, cwd=self.workdir)
        if check and result.returncode != 0:
            raise AssertionError(f"{script} {args[0]} failed:\n{result.stdout}\n{result.stderr[-6000:]}")
        return result

    def client_popen(self, *args: str, script: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(Path(__file__).parent / script), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.client_environ(), cwd=self.workdir)

    def container_ids(self) -> dict[str, str]:
        out = self.compose("ps", "-a", "--format", "json").stdout
        rows = []
        for line in out.splitlines():
            if line.strip():
                parsed = json.loads(line)
                rows.extend(parsed if isinstance(parsed, list) else [parsed])
        return {r["Service"]: r["ID"] for r in rows}


def _require_docker() -> None:
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed: the end-to-end suite needs a Docker engine "
                    "(.ci/run installs one)", pytrace=False)
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        pytest.fail(f"the Docker engine is not reachable: {info.stderr.strip()[-300:]}", pytrace=False)
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if compose.returncode != 0:
        pytest.fail("docker compose is not available (tests/run.sh links the pinned one)", pytrace=False)


@pytest.fixture(scope="session")
def standins() -> dict[str, str]:
    import fcntl

    _require_docker()
    started = time.monotonic()
    (ROOT / ".cache").mkdir(exist_ok=True)
    # One build at a time: workers side by side wait for the first, then find the images made.
    with open(ROOT / ".cache" / "standins.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([str(ROOT / "tests" / "standin-images.sh")], capture_output=True,
                                text=True, timeout=1800, check=False)
    if result.returncode != 0:
        pytest.fail(f"building stand-in images failed:\n{result.stderr[-6000:]}", pytrace=False)
    images = parse_exports(result.stdout)
    print(f"stand-ins ready in {time.monotonic() - started:.0f} s: {images}")
    (ROOT / ".cache").mkdir(exist_ok=True)
    # docs/images.md states which images the last run used as stand-ins.
    (ROOT / ".cache" / "last-e2e-standins.txt").write_text(result.stderr)
    return images


def new_stack(standins: dict[str, str], workdir: Path, project_prefix: str) -> Stack:
    """A stack of its own (Compose project, free ports on 127.0.0.1, .env, certs and
    backups under workdir), not deployed yet."""
    environ = {
        **os.environ,
        **standins,
        "STACK_ENV_FILE": str(workdir / ".env"),
        "COMPOSE_PROJECT_NAME": f"{project_prefix}{uuid.uuid4().hex[:8]}",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTP_PORT": str(free_port()),
        "HTTPS_PORT": str(free_port()),
        "S3_PORT": str(free_port()),
        "STACK_CERT_DIR": str(workdir / "certs"),
        "MLFLOW_PUBLIC_HOST": "localhost",
        "BACKUP_DIR": str(workdir / "backups"),
        # One server replica (the default is two): smaller and quicker to deploy, for the many
        # modules that do not depend on it. The default's two are deployed by
        # test_reachable_host.py (a first deploy as a user makes it).
        "MLFLOW_REPLICAS": "1",
    }
    if "BUILD_CA_CERT" not in environ and HOST_CA.exists():
        environ["BUILD_CA_CERT"] = str(HOST_CA)
    return Stack(environ=environ, workdir=workdir)


@contextmanager
def stack_lifetime(the_stack: Stack, deploy: bool = True):
    """Deploys the stack (unless deploy=False: the caller does), yields it, and always
    removes it with its volumes; prints its state and logs if a test failed meanwhile."""
    failures_before = len(_failures)
    try:
        if deploy:
            the_stack.deploy()
        yield the_stack
    finally:
        if len(_failures) > failures_before or sys.exc_info()[0] is not None:
            ps = the_stack.compose("ps", "-a", check=False).stdout
            logs = the_stack.compose("logs", "--no-color", "--tail", "80", check=False).stdout
            sys.__stderr__.write(f"\n=== {the_stack.project}: compose ps ===\n{ps}\n"
                                 f"=== {the_stack.project}: compose logs ===\n{logs}\n")
        the_stack.script("stack_remove.sh", "--purge", "--yes", check=False)


def shared(name: str, the_stack: Stack):
    """A session fixture's body: the deployment, removed after its last user (SHARED) or at the
    session's end, whichever comes first."""
    lifetime = stack_lifetime(the_stack)
    deployed = lifetime.__enter__()
    removed = False

    def remove():
        nonlocal removed
        if not removed:
            removed = True
            lifetime.__exit__(*sys.exc_info())

    _removers[name] = remove
    try:
        yield deployed
    finally:
        _removers.pop(name, None)
        remove()


@pytest.fixture(scope="session")
def stack(standins, tmp_path_factory):
    """The shared deployment. Modules that use it only add data under names of their
    own and never delete anything, so they can share it in any order; a module that
    wipes data (test_backup.py) or needs another version (test_upgrade.py) brings
    its own stack (new_stack + stack_lifetime)."""
    yield from shared("stack", new_stack(standins, tmp_path_factory.mktemp("stack"), "mlflowe2e"))


BASE_PATH = "/mlflow"


@pytest.fixture(scope="session")
def prefixed_stack(standins, tmp_path_factory):
    """A second deployment with MLFLOW_BASE_PATH: every check that matches paths
    (input guard, auth, nginx's artifact rules, the UI) runs under the prefix too."""
    the_stack = new_stack(standins, tmp_path_factory.mktemp("prefixed"), "mlflowbp")
    the_stack.environ["MLFLOW_BASE_PATH"] = BASE_PATH
    yield from shared("prefixed_stack", the_stack)


@pytest.fixture(scope="module", params=["at the root", "under MLFLOW_BASE_PATH"])
def target(request):
    """Each of the two deployments in turn, for the checks that depend on paths."""
    return request.getfixturevalue("stack" if request.param == "at the root" else "prefixed_stack")
