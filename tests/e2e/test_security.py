"""Security through nginx: authentication, permissions, host and origin checks,
path traversal, hostile input, headers. On the shared deployment: the fixture
`owned` creates the experiment, run and second user these tests check. The
checks that match paths run a second time on a stack served under
MLFLOW_BASE_PATH (`target`), where a check bound to unprefixed paths would be
skipped silently."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid

import pytest

from .conftest import streamed_from_the_store, wait_for

ROUTES = [
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=5"),
    ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=5"),
    ("POST", "/graphql"),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts?path=1"),
    ("GET", "/"),
]
ROOT_LINE = "root:x:0:0"


@pytest.fixture(scope="module")
def owned(stack):
    """An experiment and run of the admin, and a second user 'alice'."""
    admin = stack.http
    exp = admin("POST", "/api/2.0/mlflow/experiments/create", json={"name": f"sec-{uuid.uuid4().hex[:6]}"})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = admin("POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id, "start_time": 1})
    run_id = run.json()["run"]["info"]["run_id"]
    password = "alice-" + uuid.uuid4().hex
    result = subprocess.run([str(stack_root() / "stack_users.sh"), "add", "alice", "--password-stdin"],
                            input=password + "\n", capture_output=True, text=True, env=stack.environ,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout
    return {"exp_id": exp_id, "run_id": run_id, "alice": ("alice", password)}


@pytest.fixture(scope="module")
def target_run(target):
    """An experiment and run of the admin on the target stack."""
    exp = target.http("POST", "/api/2.0/mlflow/experiments/create", json={"name": f"sec-{uuid.uuid4().hex[:6]}"})
    assert exp.status_code == 200, exp.text
    run = target.http("POST", "/api/2.0/mlflow/runs/create",
                      json={"experiment_id": exp.json()["experiment_id"], "start_time": 1})
    assert run.status_code == 200, run.text
    return run.json()["run"]["info"]["run_id"]


def stack_root():
    from stack.paths import ROOT

    return ROOT


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_family_needs_a_login(target, method, path):
    kw = {"json": {"query": "{ __typename }"}} if path == "/graphql" else {}
    anonymous = target.http(method, path, auth=False, **kw)
    assert anonymous.status_code == 401, (path, anonymous.status_code)
    assert "Basic" in anonymous.headers.get("WWW-Authenticate", "")
    wrong = target.http(method, path, auth=("admin", "not-the-password"), **kw)
    assert wrong.status_code == 401, (path, wrong.status_code)
    assert target.http(method, path, **kw).status_code == 200, path


def test_a_user_without_permission_gets_403_and_cannot_overwrite_artifacts(stack, owned):
    alice = owned["alice"]
    # Default permission READ: alice may read the admin's experiment but not write to it.
    assert stack.http("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={owned['exp_id']}",
                      auth=alice).status_code == 200
    write = stack.http("POST", "/api/2.0/mlflow/runs/log-parameter", auth=alice,
                       json={"run_id": owned["run_id"], "key": "x", "value": "1"})
    assert write.status_code == 403
    artifact = f"/api/2.0/mlflow-artifacts/artifacts/{owned['exp_id']}/{owned['run_id']}/artifacts/model.pkl"
    assert stack.http("PUT", artifact, data=b"admin's file").status_code == 200
    overwrite = stack.http("PUT", artifact, auth=alice, data=b"alice was here")
    assert overwrite.status_code == 403
    assert stack.http("GET", artifact).content == b"admin's file"
    # She may read it: nginx streams it from the store once the server has checked her.
    read = stack.http("GET", artifact, auth=alice)
    assert read.status_code == 200 and read.content == b"admin's file", read.status_code
    assert streamed_from_the_store(read), read.headers
    assert stack.http("GET", artifact, auth=False).status_code == 401
    # A DENY grant takes reading away too, the file's bytes included.
    subprocess.run([str(stack_root() / "stack_users.sh"), "grant", "alice", owned["exp_id"], "DENY"],
                   env=stack.environ, check=True, capture_output=True)
    assert stack.http("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={owned['exp_id']}",
                      auth=alice).status_code == 403
    denied = stack.http("GET", artifact, auth=alice)
    assert denied.status_code == 403 and b"admin's file" not in denied.content, denied.status_code
    assert not streamed_from_the_store(denied), denied.headers
    # Her own experiment is hers.
    mine = stack.http("POST", "/api/2.0/mlflow/experiments/create", auth=alice,
                      json={"name": f"alice-own-{uuid.uuid4().hex[:6]}"})
    assert mine.status_code == 200


def test_password_change_takes_effect(stack, owned):
    new = "changed-" + uuid.uuid4().hex
    subprocess.run([str(stack_root() / "stack_users.sh"), "passwd", "alice", "--password-stdin"],
                   input=new + "\n", env=stack.environ, check=True, capture_output=True, text=True)
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert stack.http("GET", search, auth=("alice", new)).status_code == 200
    # Workers remember a checked login for MLFLOW_AUTH_CACHE_SECONDS (30): the
    # old password stops working everywhere within that.
    ttl = int(stack.values()["MLFLOW_AUTH_CACHE_SECONDS"])

    codes: list[int] = []
    seen: set[int] = set()

    def old_password_refused() -> bool:
        # Checked and refused (401), and no worker takes it any more (200). Its failures may
        # hold the login meanwhile (429, the throttle), but a worker that still had the old
        # password in its login cache would answer 200: a cached login is never held.
        codes[:] = [stack.http("GET", search, auth=owned["alice"]).status_code for _ in range(4)]
        seen.update(codes)
        return 401 in seen and set(codes) <= {401, 429}

    wait_for(old_password_refused, ttl + 15, "every worker to refuse the old password", interval=3,
             detail=lambda: codes)
    owned["alice"] = ("alice", new)


def test_forged_host_and_cross_origin_posts_get_403_but_the_ui_origin_works(target):
    stack = target
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                      headers={"Host": "evil.example.com"}).status_code == 403
    body = {"max_results": 1}
    evil = stack.http("POST", "/ajax-api/2.0/mlflow/experiments/search", json=body,
                      headers={"Origin": "https://evil.example.com"})
    assert evil.status_code == 403
    own = stack.http("POST", "/ajax-api/2.0/mlflow/experiments/search", json=body,
                     headers={"Origin": stack.origin})
    assert own.status_code == 200


TRAVERSALS = [
    "/api/2.0/mlflow-artifacts/artifacts/../../../../etc/passwd",
    "/api/2.0/mlflow-artifacts/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/2.0/mlflow-artifacts/artifacts/%252e%252e/%252e%252e/etc/passwd",
    "/api/2.0/mlflow-artifacts/artifacts/1/..%2f..%2f..%2fetc%2fpasswd",
    "/api/2.0/mlflow-artifacts/artifacts?path=../../../../etc",
    "/api/2.0/mlflow-artifacts/artifacts?path=%2e%2e%2f%2e%2e%2fetc",
    "/get-artifact?path=../../../../etc/passwd&run_uuid={run}",
    "/get-artifact?path=%2e%2e/%2e%2e/etc/passwd%23&run_uuid={run}",
    "/get-artifact?path=x%3F/../../../etc/passwd&run_uuid={run}",
    "/model-versions/get-artifact?path=../../../../etc/passwd&name=x&version=1",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_gets_4xx_and_never_file_contents(target, target_run, path):
    response = target.http("GET", path.format(run=target_run))
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])
    assert ROOT_LINE not in response.text


@pytest.mark.parametrize("location", ["file:///etc", "/etc", "s3://mlflow/artifacts/../../etc",
                                      "mlflow-artifacts:/../../x", "mlflow-artifacts:/%2e%2e/%2e%2e/x",
                                      "mlflow-artifacts:/%252e%252e/x", "mlflow-artifacts:/x#/../../etc",
                                      "http://169.254.169.254/latest/meta-data"])
def test_artifact_location_tricks_get_4xx(target, location):
    stack = target
    name = f"loc-{uuid.uuid4().hex[:6]}"
    response = stack.http("POST", "/api/2.0/mlflow/experiments/create",
                          json={"name": name, "artifact_location": location})
    assert 400 <= response.status_code < 500, (location, response.status_code, response.text[:200])
    assert ROOT_LINE not in response.text
    assert stack.http("GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}").status_code == 404


def _batch(run_id, **kw):
    return {"run_id": run_id, **kw}


HOSTILE = {
    "1001 metrics": lambda r: ("json", _batch(r, metrics=[{"key": "m", "value": 1, "timestamp": 1, "step": i}
                                                         for i in range(1001)])),
    "101 params": lambda r: ("json", _batch(r, params=[{"key": f"p{i}", "value": "v"} for i in range(101)])),
    "non-numeric metric": lambda r: ("json", _batch(r, metrics=[{"key": "m", "value": "abc", "timestamp": 1}])),
    "negative timestamp": lambda r: ("json", _batch(r, metrics=[{"key": "m", "value": 1, "timestamp": -5}])),
    "malformed JSON": lambda r: ("raw", b'{"run_id": "' + r.encode() + b'", "metrics": [{'),
    "wrong content type": lambda r: ("text", json.dumps(_batch(r, params=[{"key": "p", "value": "v"}]))),
    "6001-character param": lambda r: ("json", _batch(r, params=[{"key": "p", "value": "x" * 6001}])),
    "oversized body": lambda r: ("raw", b'{"run_id": "' + r.encode() + b'", "pad": "' + b"x" * (65 << 20) + b'"}'),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_gets_4xx_stores_nothing_and_the_server_stays_healthy(target, target_run, name):
    stack, run_id = target, target_run
    kind, payload = HOSTILE[name](run_id)
    if kind == "json":
        kw = {"json": payload}
    elif kind == "raw":
        kw = {"data": payload, "headers": {"Content-Type": "application/json"}}
    else:
        kw = {"data": payload, "headers": {"Content-Type": "text/plain"}}
    response = stack.http("POST", "/api/2.0/mlflow/runs/log-batch", **kw)
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    if response.status_code != 413:  # nginx answers the oversized body itself
        error = response.json()
        assert error["error_code"] and error["message"], error
    run = stack.http("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}").json()["run"]
    assert not run["data"].get("metrics"), f"{name}: a metric was stored"
    assert not [p for p in run["data"].get("params", []) if p["key"] != "x"], f"{name}: a param was stored"
    assert stack.http("GET", "/health", auth=False).status_code == 200


def test_security_headers_and_no_version_banner(stack):
    response = stack.http("GET", "/health", auth=False)
    headers = response.headers
    assert headers["Server"] == "nginx"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "SAMEORIGIN"
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    assert "Referrer-Policy" in headers


def test_env_file_is_private(stack):
    assert stat.S_IMODE(os.stat(stack.env_file).st_mode) == 0o600
    key = stack.environ["STACK_CERT_DIR"] + "/ca.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_containers_run_with_least_privilege(stack):
    ids = stack.container_ids()
    for service in ("db", "minio", "mlflow", "nginx"):
        info = json.loads(subprocess.run(["docker", "inspect", ids[service]], capture_output=True, text=True,
                                         check=True).stdout)[0]
        host = info["HostConfig"]
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        assert host["CapDrop"] == ["ALL"], service
        assert host["ReadonlyRootfs"] is True, service
        assert host["Memory"] > 0, service
    mlflow_user = json.loads(subprocess.run(["docker", "inspect", ids["mlflow"]], capture_output=True, text=True,
                                            check=True).stdout)[0]["Config"]["User"]
    assert mlflow_user not in ("", "0", "root")


def test_user_store_lives_in_postgresql(stack, owned):
    db = stack.values()["POSTGRES_DB"] + "_auth"
    users = stack.compose("exec", "-T", "db", "psql", "-U", stack.values()["POSTGRES_USER"], "-d", db, "-Atc",
                          "SELECT username FROM users ORDER BY username").stdout.split()
    assert {"admin", "alice"} <= set(users)
