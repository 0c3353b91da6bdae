"""The first day: the printed address works for a colleague, and a server crash stalls nobody.

A deployment of its own whose first deploy is given no MLFLOW_PUBLIC_HOST and no
MLFLOW_REPLICAS, as a user's would be: it prints a name or address that is not loopback,
and a request to it over TLS, trusting the printed CA, sent from a container on a network
of its own (not from this machine's loopback), is answered. Its ports bind to that address
only. It runs two server replicas: nginx spreads requests over both (each replica's own
request counters rise), MLflow 3's GenAI features work with spans reaching either, and one
is killed (SIGKILL) while clients log: no metric call fails or goes unanswered, nothing
acknowledged is lost, and the longest pause is printed (replicas.py has the details).
(That the shared deployment, made for localhost, printed the loopback warning is checked
in test_stack.py.)"""

from __future__ import annotations

import json
import subprocess
import uuid
from urllib.parse import urlsplit

import pytest

from stack import common

from .conftest import new_stack, show, stack_lifetime, wait_for
from .replicas import all_healthy, kill_a_replica_while_clients_log, replicas, served

pytestmark = pytest.mark.slow

# A colleague's first call: an authenticated API request, the answer's status and experiments.
COLLEAGUE = """
import json, sys, requests
url, user, password = sys.stdin.read().split()
answer = requests.get(url + "/api/2.0/mlflow/experiments/search?max_results=5", auth=(user, password),
                      verify="/ca/ca-bundle.pem", timeout=60)
print(json.dumps({"status": answer.status_code, "names": [e["name"] for e in answer.json().get("experiments", [])]}))
"""


@pytest.fixture(scope="module")
def first_day(standins, tmp_path_factory):
    from stack import host

    address = host.default_route_address()
    assert address, "this machine has no address but loopback: nothing to test"
    the_stack = new_stack(standins, tmp_path_factory.mktemp("firstday"), "mlflowfd")
    # As a user's first deploy: no name chosen, the default number of replicas.
    del the_stack.environ["MLFLOW_PUBLIC_HOST"]
    del the_stack.environ["MLFLOW_REPLICAS"]
    the_stack.environ["BIND_ADDRESS"] = address
    with stack_lifetime(the_stack) as deployed:
        yield deployed


def test_the_printed_address_is_not_loopback_and_a_colleague_reaches_it(first_day):
    printed = first_day.client_env["MLFLOW_TRACKING_URI"]
    public = urlsplit(printed).hostname
    assert public and not common.resolves_to_loopback(public), printed
    assert first_day.values()["MLFLOW_PUBLIC_HOST"] == public
    assert "is this machine's loopback" not in first_day.deploy_output

    network = f"colleague-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "network", "create", network], check=True, capture_output=True)
    try:
        values = first_day.values()
        ref = subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}",
                              first_day.container_ids()["mlflow"]], check=True, capture_output=True,
                             text=True).stdout.strip()
        certs = first_day.environ["STACK_CERT_DIR"]
        # As root: certs/ is the deploying user's, mode 700.
        answer = subprocess.run(
            ["docker", "run", "--rm", "-i", "--network", network, "--user", "0", "-v", f"{certs}:/ca:ro",
             "--entrypoint", "python3", ref, "-c", COLLEAGUE],
            input=f"{printed} {values['MLFLOW_ADMIN_USERNAME']} {values['MLFLOW_ADMIN_PASSWORD']}",
            capture_output=True, text=True, timeout=180, check=False)
    finally:
        subprocess.run(["docker", "network", "rm", network], check=False, capture_output=True)
    assert answer.returncode == 0, answer.stderr[-3000:]
    seen = json.loads(answer.stdout.strip().splitlines()[-1])
    assert seen["status"] == 200 and "Default" in seen["names"], seen


def test_two_replicas_share_the_requests(first_day):
    assert first_day.values()["MLFLOW_REPLICAS"] == "2"
    assert all_healthy(first_day, 2), replicas(first_day)
    before = [served(first_day, i) for i in (1, 2)]
    printed = first_day.client_env["MLFLOW_TRACKING_URI"].rstrip("/")  # its ports are on that address only
    for _ in range(40):
        assert first_day.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1", base=printed).status_code == 200
    after = [served(first_day, i) for i in (1, 2)]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) - sum(before) >= 40


def test_genai_works_with_spans_reaching_either_replica(first_day, tmp_path):
    from .test_genai import assert_genai_works, run_genai_client

    # Both replicas serve (another test of this module kills one; it waits for its return).
    wait_for(lambda: all_healthy(first_day, 2), 180, "both replicas healthy", interval=3,
             detail=lambda: replicas(first_day))
    assert_genai_works(run_genai_client(first_day, tmp_path), first_day)


def test_the_default_deploy_survives_a_server_crash(first_day, tmp_path):
    from .test_bench import stack_memory_mib

    assert first_day.values()["MLFLOW_REPLICAS"] == "2"
    assert all_healthy(first_day, 2), replicas(first_day)
    memory, containers = stack_memory_mib(first_day)
    show(f"default deploy at rest: {memory:,.0f} MiB over {containers} running containers")
    # No metric call fails (a lone server's restart would fail them): the pause is printed, not bound.
    kill_a_replica_while_clients_log(first_day, tmp_path, "default deploy, a replica killed")
