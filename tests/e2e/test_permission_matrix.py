"""The permission matrix, end to end through nginx, at the root and under MLFLOW_BASE_PATH
(`target`): one user per permission on the admin's experiment (DENY, READ, USE, EDIT,
MANAGE), each trying what MLflow's permission model gives or denies
them across the route families: REST 2.0 and the UI's ajax-api, GraphQL, proxied
artifacts, OTLP /v1/traces, the experiment's own permissions and MLflow 3.17's roles API.
Asserted on the data:
rows in PostgreSQL, bytes of the artifact, what a read returned.

MLflow's model (mlflow.server.auth.permissions): READ may read; USE also use (the same as
READ for an experiment); EDIT also change (log, tag, upload, export traces); MANAGE also
delete and grant. DENY none of these.
"""

from __future__ import annotations

import gzip
import re
import uuid

import pytest

from .genai_client import otlp_body

PERMISSIONS = ("DENY", "READ", "USE", "EDIT", "MANAGE")
LEVEL = {**{p: i for i, p in enumerate(PERMISSIONS)}, "ADMIN": len(PERMISSIONS)}
SECRET = b"the experiment's artifact"


@pytest.fixture(scope="module")
def matrix(target):
    """The admin's experiment, its run and artifact, and a user (with a run of the admin's to
    delete) per permission."""
    tag = uuid.uuid4().hex[:6]
    exp = target.http("POST", "/api/2.0/mlflow/experiments/create", json={"name": f"matrix-{tag}"})
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]

    def new_run() -> str:
        run = target.http("POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id, "start_time": 1})
        assert run.status_code == 200, run.text
        return run.json()["run"]["info"]["run_id"]

    run_id = new_run()
    artifact = f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/kept.txt"
    assert target.http("PUT", artifact, data=SECRET).status_code == 200
    users = {}
    # "other": the one whose permission the others try to change (no grant: the default).
    for permission in (*PERMISSIONS, "other"):
        name, password = f"mx-{permission.lower()[:6]}-{tag}", uuid.uuid4().hex
        assert target.http("POST", "/api/2.0/mlflow/users/create",
                           json={"username": name, "password": password}).status_code == 200
        if permission != "other":
            granted = target.http("POST", "/api/3.0/mlflow/users/permissions/grant",
                                  json={"username": name, "resource_type": "experiment", "resource_id": exp_id,
                                        "permission": permission})
            assert granted.status_code == 200, granted.text
        users[permission] = {"login": (name, password), "doomed_run": new_run()}
    # The admin, who may do everything: each operation is shown to be doable as it is sent.
    values = target.values()
    users["ADMIN"] = {"login": (values["MLFLOW_ADMIN_USERNAME"], values["MLFLOW_ADMIN_PASSWORD"]),
                      "doomed_run": new_run()}
    return {"exp_id": exp_id, "run_id": run_id, "artifact": artifact, "users": users, "tag": tag}


def rows(target, sql: str, db_suffix: str = "") -> int:
    return int(target.psql(sql, db_suffix))


def attempt(target, matrix, permission: str, operation: str) -> bool:
    """Whether the user with `permission` did `operation`, judged by the data."""
    user = matrix["users"][permission]
    login, exp_id, run_id = user["login"], matrix["exp_id"], matrix["run_id"]
    key = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{operation}-{login[0]}")  # a valid metric, tag and file name
    http = lambda method, path, **kw: target.http(method, path, auth=login, **kw)  # noqa: E731
    if operation == "read experiment (REST)":
        answer = http("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={exp_id}")
        return answer.status_code == 200 and answer.json()["experiment"]["experiment_id"] == exp_id
    if operation == "read run (ajax-api)":
        answer = http("GET", f"/ajax-api/2.0/mlflow/runs/get?run_id={run_id}")
        return answer.status_code == 200 and answer.json()["run"]["info"]["run_id"] == run_id
    if operation == "search runs":
        answer = http("POST", "/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id]})
        return answer.status_code == 200 and run_id in {r["info"]["run_id"] for r in answer.json().get("runs", [])}
    if operation == "read run (GraphQL)":
        query = '{ mlflowGetRun(input: {runId: "%s"}) { run { info { runId } } } }' % run_id
        answer = http("POST", "/graphql", json={"query": query})
        run = ((answer.json().get("data") or {}).get("mlflowGetRun") or {}).get("run") if answer.ok else None
        return bool(run) and run["info"]["runId"] == run_id
    if operation == "read artifact":
        answer = http("GET", matrix["artifact"])
        if SECRET in answer.content:
            assert answer.status_code == 200
            return True
        return False
    if operation == "log metric":
        http("POST", "/api/2.0/mlflow/runs/log-metric", json={"run_id": run_id, "key": key, "value": 1, "timestamp": 1})
        return rows(target, f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' AND key = '{key}'") == 1
    if operation == "set run tag (ajax-api)":
        http("POST", "/ajax-api/2.0/mlflow/runs/set-tag", json={"run_id": run_id, "key": key, "value": "v"})
        return rows(target, f"SELECT count(*) FROM tags WHERE run_uuid = '{run_id}' AND key = '{key}'") == 1
    if operation == "set experiment tag":
        http("POST", "/api/2.0/mlflow/experiments/set-experiment-tag",
             json={"experiment_id": exp_id, "key": key, "value": "v"})
        return rows(target, f"SELECT count(*) FROM experiment_tags WHERE experiment_id = {exp_id} "
                            f"AND key = '{key}'") == 1
    if operation == "upload artifact":
        path = f"/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/{key}.txt"
        http("PUT", path, data=b"from " + login[0].encode())
        return target.http("GET", path).content == b"from " + login[0].encode()
    if operation == "export traces (OTLP)":
        trace_id = uuid.uuid4().bytes
        http("POST", "/v1/traces", data=gzip.compress(otlp_body(trace_id, uuid.uuid4().bytes[:8], key)),
             headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip",
                      "x-mlflow-experiment-id": exp_id})
        return rows(target, f"SELECT count(*) FROM trace_info WHERE request_id = 'tr-{trace_id.hex()}'") == 1
    if operation == "delete run":
        doomed = user["doomed_run"]
        http("POST", "/api/2.0/mlflow/runs/delete", json={"run_id": doomed})
        return target.psql(f"SELECT lifecycle_stage FROM runs WHERE run_uuid = '{doomed}'") == "deleted"
    if operation == "grant a permission":
        grant = {"username": matrix["users"]["other"]["login"][0], "resource_type": "experiment",
                 "resource_id": exp_id}
        held = lambda: target.http("GET", "/api/3.0/mlflow/users/permissions/get", params=grant).json()  # noqa: E731
        before = held()["permission"]
        http("POST", "/api/3.0/mlflow/users/permissions/grant", json={**grant, "permission": "EDIT"})
        changed = held()["permission"] == "EDIT"
        if changed:
            assert target.http("POST", "/api/3.0/mlflow/users/permissions/revoke", json=grant).status_code == 200
            assert held()["permission"] == before
        return changed
    if operation == "create a role (roles API)":
        http("POST", "/api/3.0/mlflow/roles/create", json={"name": key, "workspace": "default"})
        return rows(target, f"SELECT count(*) FROM roles WHERE name = '{key}'", "_auth") == 1
    raise AssertionError(operation)


# The least permission each operation needs in MLflow's model.
NEEDS = {
    "read experiment (REST)": "READ",
    "read run (ajax-api)": "READ",
    "search runs": "READ",
    "read run (GraphQL)": "READ",
    "read artifact": "READ",
    "log metric": "EDIT",
    "set run tag (ajax-api)": "EDIT",
    "set experiment tag": "EDIT",
    "upload artifact": "EDIT",
    "export traces (OTLP)": "EDIT",
    "delete run": "MANAGE",
    "grant a permission": "MANAGE",
    # Roles are the admins' (a permission on one experiment does not reach them).
    "create a role (roles API)": "ADMIN",
}


@pytest.mark.parametrize("operation", list(NEEDS))
def test_each_permission_does_exactly_what_it_grants(target, matrix, operation):
    done = {p: attempt(target, matrix, p, operation) for p in (*PERMISSIONS, "ADMIN")}
    expected = {p: LEVEL[p] >= LEVEL[NEEDS[operation]] for p in (*PERMISSIONS, "ADMIN")}
    assert done == expected, operation
