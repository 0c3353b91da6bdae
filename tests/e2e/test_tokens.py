"""Access tokens (mlflow/stack_tokens.py), on the shared deployment, through nginx.

A script given only a token (MLflow's stock client, MLFLOW_TRACKING_TOKEN) logs a run,
metrics and an artifact: asserted on the rows in PostgreSQL and the object's checksum in
the bucket. A revoked token, an expired one, a made-up one and the token of an account
deleted and made again under its name are refused; a token can neither change its
account's password nor make tokens; the user's own token and the admin's for them are
listed with their last use.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid

from .conftest import wait_for
from .test_stack import object_sha256, s3_client

# A script of a user's, with only the server's address, its CA and the token.
SCRIPT = r'''
import hashlib, json, os, sys, tempfile
import mlflow
from mlflow.tracking import MlflowClient

mlflow.set_experiment(sys.argv[1])
path = os.path.join(tempfile.mkdtemp(), "weights.bin")
with open(path, "wb") as fh:
    fh.write(os.urandom(3 << 20))
with mlflow.start_run() as run:
    for step in range(20):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_param("optimizer", "adam")
    mlflow.log_artifact(path, "model")
back = MlflowClient().download_artifacts(run.info.run_id, "model/weights.bin", tempfile.mkdtemp())
digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
print(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                  "sha256": digest(path), "read_back": digest(back)}))
'''


def token_environ(stack, token: str) -> dict[str, str]:
    environ = {k: v for k, v in stack.client_environ().items()
               if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    return {**environ, "MLFLOW_TRACKING_TOKEN": token}


def bearer(stack, token: str, method: str = "GET", path: str = "/api/2.0/mlflow/experiments/search?max_results=1",
           **kw):
    return stack.http(method, path, auth=False, headers={"Authorization": f"Bearer {token}"}, **kw)


def made_token(result) -> str:
    return next(line.split("=", 1)[1] for line in result.stdout.splitlines()
                if line.startswith("MLFLOW_TRACKING_TOKEN="))


def test_a_script_with_a_token_logs_and_reads_back_as_its_account(stack):
    user = f"tok{uuid.uuid4().hex[:8]}"
    added = stack.script("stack_users.sh", "add", user)
    password = next(line.split("=", 1)[1] for line in added.stdout.splitlines()
                    if line.startswith("MLFLOW_TRACKING_PASSWORD="))
    assert password not in added.stderr
    # One the user makes for themselves with their password (as with curl -u); one the
    # admin makes for them; one that expires in two seconds, never used before it does.
    own = stack.http("POST", "/api/2.0/stack/tokens/create", auth=(user, password),
                     json={"name": "laptop", "expires": "1d"})
    assert own.status_code == 200, own.text
    own = own.json()
    assert own["username"] == user and own["token"].startswith("mlflow_stack_")
    by_admin = stack.script("stack_users.sh", "token", "create", "ci-nightly", "--user", user, "--expires", "7d")
    ci_token = made_token(by_admin)
    assert ci_token not in by_admin.stderr
    short = made_token(stack.script("stack_users.sh", "token", "create", "short", "--user", user, "--expires", "2s"))
    expired_at = time.monotonic() + 2

    experiment = f"tokens-{user}"
    script = subprocess.run([sys.executable, "-c", SCRIPT, experiment], capture_output=True, text=True,
                            env=token_environ(stack, ci_token), cwd=stack.workdir, timeout=600, check=False)
    assert script.returncode == 0, script.stderr[-4000:]
    logged = json.loads(script.stdout.strip().splitlines()[-1])
    assert logged["read_back"] == logged["sha256"]
    run_id = logged["run_id"]
    assert stack.psql(f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' AND key = 'loss'") == "20"
    assert stack.psql(f"SELECT value FROM params WHERE run_uuid = '{run_id}' AND key = 'optimizer'") == "adam"
    assert stack.psql(f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == "FINISHED"
    values = stack.values()
    key = f"artifacts/{logged['experiment_id']}/{run_id}/artifacts/model/weights.bin"
    assert object_sha256(s3_client(stack), values["MLFLOW_BUCKET"], key) == logged["sha256"]
    # The experiment is the token's account's: MANAGE on what it made.
    permissions = stack.http("GET", f"/api/3.0/mlflow/users/permissions/list?username={user}").json()
    assert any(p["resource_pattern"] == logged["experiment_id"] and p["permission"] == "MANAGE"
               for p in permissions["permissions"]), permissions

    # The same token as the password works too; as the admin's, it is refused.
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                      auth=(user, ci_token)).status_code == 200
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                      auth=(values["MLFLOW_ADMIN_USERNAME"], ci_token)).status_code == 401
    # A token cannot become its account: no password change, no new tokens.
    changed = bearer(stack, ci_token, "PATCH", "/api/2.0/mlflow/users/update-password",
                     json={"username": user, "password": "x" * 20, "current_password": ci_token})
    assert changed.status_code == 403 and "cannot change accounts" in changed.json()["message"]
    minted = bearer(stack, ci_token, "POST", "/api/2.0/stack/tokens/create", json={"name": "more"})
    assert minted.status_code == 403
    # Nor can an admin's token make an account (it would outlive the token).
    admin_token = made_token(stack.script("stack_users.sh", "token", "create", "admin-ci", "--user",
                                          values["MLFLOW_ADMIN_USERNAME"], "--expires", "1h"))
    assert bearer(stack, admin_token).status_code == 200
    made = bearer(stack, admin_token, "POST", "/api/2.0/mlflow/users/create",
                  json={"username": f"x{user}", "password": "p" * 20})
    assert made.status_code == 403 and stack.psql(f"SELECT count(*) FROM users WHERE username = 'x{user}'",
                                                   "_auth") == "0"
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                      auth=(user, password)).status_code == 200, "the password changed"
    # A made-up token is refused.
    fake = ci_token[:-6] + ("A" * 6 if not ci_token.endswith("AAAAAA") else "B" * 6)
    assert bearer(stack, fake).status_code == 401

    listed = stack.script("stack_users.sh", "token", "list", "--user", user).stdout
    rows = {line.split()[2]: line for line in listed.splitlines() if line.split()[1:2] == [user]}
    assert set(rows) == {"laptop", "ci-nightly", "short"}, listed
    assert "last used never" in rows["laptop"] and "last used never" not in rows["ci-nightly"]
    assert f"made by {values['MLFLOW_ADMIN_USERNAME']}" in rows["ci-nightly"] and f"made by {user}" in rows["laptop"]

    # Revoked: the used token stops within MLFLOW_AUTH_CACHE_SECONDS (a worker may hold
    # its checked login that long), the never-used one at once.
    stack.script("stack_users.sh", "token", "revoke", own["id"])
    ci_id = ci_token.split("_")[2]
    stack.script("stack_users.sh", "token", "revoke", ci_id)
    revoked_at = time.monotonic()
    assert bearer(stack, own["token"]).status_code == 401
    time.sleep(max(0.0, expired_at - time.monotonic()) + 1)
    assert bearer(stack, short).status_code == 401, "an expired token was taken"
    ttl = int(values["MLFLOW_AUTH_CACHE_SECONDS"])
    wait_for(lambda: all(bearer(stack, ci_token).status_code == 401 for _ in range(8)), ttl + 15,
             "the revoked token to be refused")
    print(f"tokens: the revoked token was refused {time.monotonic() - revoked_at:.1f} s after its revocation "
          f"(MLFLOW_AUTH_CACHE_SECONDS={ttl})")
    states = stack.script("stack_users.sh", "token", "list", "--user", user).stdout
    assert states.count(" revoked ") == 2 and states.count(" expired ") == 1, states


def test_a_deleted_accounts_token_does_not_pass_to_its_namesake(stack):
    user = f"tok{uuid.uuid4().hex[:8]}"
    stack.script("stack_users.sh", "add", user)
    token = made_token(stack.script("stack_users.sh", "token", "create", "ci", "--user", user))
    stack.script("stack_users.sh", "delete", user)
    stack.script("stack_users.sh", "add", user)
    assert bearer(stack, token).status_code == 401
    nobody = stack.script("stack_users.sh", "token", "create", "ci", "--user", f"no{user}", check=False)
    assert nobody.returncode != 0 and f"there is no account 'no{user}'" in nobody.stderr, nobody.stderr
    # Kept as its digest only.
    stored = stack.psql("SELECT string_agg(id || ' ' || digest, ',') FROM stack_tokens", "_auth")
    assert hashlib.sha256(token.encode()).hexdigest() in stored and token.split("_", 3)[3] not in stored
