"""Authorization on exactly what is executed, through nginx, at the root and under
MLFLOW_BASE_PATH (`target`): a user with DENY on another user's experiment cannot
reach its run by spelling the id another way (a camelCase alias beside a run of her
own, run_id and run_uuid naming different runs), by a '.' segment in an artifact
path, by a body the auth layer does not read (DELETE with another Content-Type), nor
move an experiment's artifacts out of the store with `artifactLocation`. Asserted on
the data: the victim's rows in PostgreSQL and objects in the bucket are unchanged, and
no byte of the victim's artifact comes back."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
import uuid
from base64 import b64encode
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stack.paths import ROOT

from .test_stack import s3_client

SECRET = b"the victim's secret artifact"


@pytest.fixture(scope="module")
def scene(target):
    """The admin's experiment and run (the victim's), a user with DENY on it, and her own run."""
    tag = uuid.uuid4().hex[:6]
    exp = target.http("POST", "/api/2.0/mlflow/experiments/create", json={"name": f"victim-{tag}"})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = target.http("POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id, "start_time": 1})
    victim = run.json()["run"]["info"]["run_id"]
    assert target.http("POST", "/api/2.0/mlflow/runs/log-parameter",
                       json={"run_id": victim, "key": "p", "value": "kept"}).status_code == 200
    secret = f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{victim}/artifacts/secret.txt"
    assert target.http("PUT", secret, data=SECRET).status_code == 200
    model = f"victim-model-{tag}"
    assert target.http("POST", "/api/2.0/mlflow/registered-models/create", json={"name": model}).status_code == 200

    name, password = f"mallory{tag}", uuid.uuid4().hex
    users = str(ROOT / "stack_users.sh")
    added = subprocess.run([users, "add", name, "--password-stdin"], input=password + "\n", capture_output=True,
                           text=True, env=target.environ, check=False)
    assert added.returncode == 0, added.stderr
    subprocess.run([users, "grant", name, exp_id, "DENY"], env=target.environ, check=True, capture_output=True)
    mallory = (name, password)
    own_exp = target.http("POST", "/api/2.0/mlflow/experiments/create", auth=mallory,
                          json={"name": f"mallory-own-{tag}"}).json()["experiment_id"]
    own = target.http("POST", "/api/2.0/mlflow/runs/create", auth=mallory,
                      json={"experiment_id": own_exp, "start_time": 1}).json()["run"]["info"]["run_id"]
    own_model = f"mallory-model-{tag}"
    assert target.http("POST", "/api/2.0/mlflow/registered-models/create", auth=mallory,
                       json={"name": own_model}).status_code == 200
    return {"exp_id": exp_id, "exp_name": f"victim-{tag}", "victim": victim, "secret": secret, "model": model, "mallory": mallory,
            "own": own, "own_model": own_model}


def victim_rows(stack, run_id: str) -> str:
    """Everything PostgreSQL holds of the run: its row, metrics, params and tags."""
    return stack.psql(
        f"SELECT status, lifecycle_stage, end_time, name FROM runs WHERE run_uuid = '{run_id}';"
        f"SELECT key, value, step FROM metrics WHERE run_uuid = '{run_id}' ORDER BY key, step;"
        f"SELECT key, value FROM params WHERE run_uuid = '{run_id}' ORDER BY key;"
        f"SELECT key, value FROM tags WHERE run_uuid = '{run_id}' ORDER BY key;")


def raw_request(stack, method: str, path: str, auth, body: bytes = b"", headers: dict | None = None):
    """A request sent exactly as written (requests and urllib3 drop '.' segments)."""
    url = urlsplit(stack.base_url)
    context = ssl.create_default_context(cafile=stack.ca_bundle)
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=60)
    login = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        # http.client sends each header as given; a list value is sent once per item.
        conn.putrequest(method, url.path + path, skip_accept_encoding=True)
        for name, value in {"Authorization": f"Basic {login}", "Content-Length": str(len(body)),
                            **(headers or {})}.items():
            for one in value if isinstance(value, list) else [value]:
                conn.putheader(name, one)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


WRITES = {
    "runs/log-metric": {"key": "stolen", "value": 1, "timestamp": 1, "step": 0},
    "runs/set-tag": {"key": "stolen", "value": "x"},
    "runs/log-parameter": {"key": "stolen", "value": "x"},
    "runs/log-batch": {"metrics": [{"key": "stolen", "value": 1, "timestamp": 1, "step": 0}]},
    "runs/update": {"status": "FAILED", "run_name": "stolen", "end_time": 2},
    "runs/delete": {},
}


@pytest.mark.parametrize("endpoint", list(WRITES))
def test_a_camel_case_run_id_beside_her_own_run_changes_nothing(target, scene, endpoint):
    before = victim_rows(target, scene["victim"])
    mallory = scene["mallory"]
    # The plain spelling is refused by the permission check...
    plain = target.http("POST", f"/api/2.0/mlflow/{endpoint}", auth=mallory,
                        json={"run_id": scene["victim"], **WRITES[endpoint]})
    assert plain.status_code == 403, plain.text
    # ...and the alias beside a run of her own by the guard, before any check or handler.
    for body in ({"run_uuid": scene["own"], "runId": scene["victim"]}, {"runId": scene["victim"]},
                 {"run_id": scene["own"], "run_uuid": scene["victim"]}):
        sneaky = target.http("POST", f"/api/2.0/mlflow/{endpoint}", auth=mallory, json={**body, **WRITES[endpoint]})
        assert sneaky.status_code == 400, (body, sneaky.status_code, sneaky.text)
    assert victim_rows(target, scene["victim"]) == before
    # Her own run, spelled as MLflow's clients spell it, still takes the write.
    if endpoint != "runs/delete":
        mine = target.http("POST", f"/api/2.0/mlflow/{endpoint}", auth=mallory,
                           json={"run_id": scene["own"], **WRITES[endpoint]})
        assert mine.status_code == 200, mine.text


def test_the_uis_upload_cannot_name_two_runs(target, scene):
    mallory = scene["mallory"]
    status, _ = raw_request(target, "POST", "/ajax-api/2.0/mlflow/upload-artifact?run_id={}&run_uuid={}&path=stolen.txt"
                            .format(scene["own"], scene["victim"]), mallory, b"stolen",
                            {"Content-Type": "text/plain"})
    assert status == 400
    keys = [o["Key"] for o in s3_client(target).list_objects_v2(
        Bucket=target.values()["MLFLOW_BUCKET"], Prefix=f"artifacts/{scene['exp_id']}/").get("Contents", [])]
    assert not [k for k in keys if k.endswith("stolen.txt")], keys


@pytest.mark.parametrize("spelling", ["./{exp}/{run}/artifacts/secret.txt", "%2E/{exp}/{run}/artifacts/secret.txt",
                                      "%252E/{exp}/{run}/artifacts/secret.txt",
                                      "{exp}/./{run}/artifacts/secret.txt", "x/../{exp}/{run}/artifacts/secret.txt"])
def test_a_dot_segment_does_not_skip_the_experiment_check(target, scene, spelling):
    path = spelling.format(exp=scene["exp_id"], run=scene["victim"])
    mallory = scene["mallory"]
    assert target.http("GET", scene["secret"], auth=mallory).status_code == 403
    for target_path in (f"/api/2.0/mlflow-artifacts/artifacts/{path}",
                        f"/api/2.0/mlflow-artifacts/artifacts?path={path.rsplit('/', 1)[0]}"):
        status, content = raw_request(target, "GET", target_path, mallory)
        assert 400 <= status < 500, (target_path, status)
        assert SECRET not in content and b"secret.txt" not in content, (target_path, content[:200])


@pytest.mark.parametrize("content_type", ["text/plain", ["text/plain", "application/json"]],
                         ids=["text", "two content types"])
def test_a_body_the_auth_layer_does_not_read_deletes_nothing(target, scene, content_type):
    mallory = scene["mallory"]
    status, _ = raw_request(target, "DELETE", f"/api/2.0/mlflow/registered-models/delete?name={scene['own_model']}",
                            mallory, f'{{"name": "{scene["model"]}"}}'.encode(), {"Content-Type": content_type})
    assert status == 415
    assert target.psql(f"SELECT count(*) FROM registered_models WHERE name = '{scene['model']}'") == "1"
    assert target.psql(f"SELECT count(*) FROM registered_models WHERE name = '{scene['own_model']}'") == "1"


@pytest.mark.parametrize("location", ["file:///run/secrets", "s3://other-bucket/x"])
def test_the_camel_case_artifact_location_is_checked_too(target, scene, location):
    name = f"moved-{uuid.uuid4().hex[:6]}"
    response = target.http("POST", "/api/2.0/mlflow/experiments/create", auth=scene["mallory"],
                           json={"name": name, "artifactLocation": location})
    assert response.status_code == 400, response.text
    assert target.psql(f"SELECT count(*) FROM experiments WHERE name = '{name}'") == "0"


def test_a_colleagues_bundle_logs_in_as_her_and_reads_what_she_may(target, scene, tmp_path):
    name, password = scene["mallory"]
    target.script("show_all.sh", "--client-bundle", str(tmp_path / "bundle"), "--user", name)
    code = ("import mlflow; names = {e.name for e in mlflow.search_experiments()}; "
            "print('\\n'.join(sorted(names)))")
    script = f'. ./mlflow.env && export MLFLOW_TRACKING_PASSWORD="$1" && python3 -c "{code}"'
    environ = {k: v for k, v in target.client_environ().items()
               if not k.startswith(("MLFLOW_", "REQUESTS_", "AWS_"))}
    seen = subprocess.run(["bash", "-c", script, "bash", password], cwd=tmp_path / "bundle",
                          env={**environ, "PATH": f"{Path(sys.executable).parent}:{environ.get('PATH', '')}"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert seen.returncode == 0, seen.stderr[-3000:]
    assert any(line.startswith("mallory-own-") for line in seen.stdout.splitlines()), seen.stdout
    # The experiment she has DENY on is not listed to her.
    assert scene["exp_name"] not in seen.stdout.splitlines(), seen.stdout
