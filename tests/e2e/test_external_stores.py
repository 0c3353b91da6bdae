"""External stores: the stack against a PostgreSQL and an S3 store it does not
run (POSTGRES_HOST, S3_ENDPOINT_URL).

The two stores are the upstream images (or their stand-ins) started on their
own, with ports published on the host's docker0 address: reached from the
stack's containers the way a managed database or an S3 service would be, over
a route out of the stack. The database role is not a superuser: it owns its
database and may create databases, as on a managed service.

Wrong credentials stop the deploy before anything starts, each store named
with the setting to fix. With the right ones the stack runs without db and
minio; a remote client's run, metrics and artifacts land in those stores (read
there, not through the stack); show_all names them; the online backup and
restore round-trip through them; a cold copy is refused with the reason; and
./stack_remove.sh --purge leaves their data alone.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import uuid
from pathlib import Path

import pytest

from stack import envfile, pins

from .conftest import free_port, new_stack, stack_lifetime, wait_for
from .receivers import host_address

pytestmark = pytest.mark.slow

ROLE, DATABASE, BUCKET = "tracker", "team_tracking", "team-artifacts"


def docker(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}: {result.stderr[-2000:]}")
    return result


def image(standins: dict[str, str], var: str) -> str:
    return standins.get(var) or pins.image_pins()[var]


@pytest.fixture(scope="module")
def outside(standins):
    """A PostgreSQL server and an S3 store the stack does not run, on the host's docker0 address."""
    gateway = host_address()
    name = f"mlflowext{uuid.uuid4().hex[:8]}"
    stores = {
        "name": name, "gateway": gateway, "pg_port": free_port(), "s3_port": free_port(),
        "superuser_password": secrets.token_hex(16), "password": secrets.token_hex(16),
        "access_key": "team-key", "secret_key": secrets.token_hex(20),
    }
    try:
        docker("run", "-d", "--name", f"{name}-pg", "-e", "POSTGRES_PASSWORD=" + stores["superuser_password"],
               "-p", f"{gateway}:{stores['pg_port']}:5432", image(standins, "POSTGRES_IMAGE"))
        docker("run", "-d", "--name", f"{name}-s3", "-e", "MINIO_ROOT_USER=" + stores["access_key"],
               "-e", "MINIO_ROOT_PASSWORD=" + stores["secret_key"], "-p", f"{gateway}:{stores['s3_port']}:9000",
               image(standins, "MINIO_IMAGE"), "server", "/data", "--address", ":9000")
        wait_for(lambda: docker("exec", f"{name}-pg", "pg_isready", "-h", "127.0.0.1", "-U", "postgres",
                                check=False).returncode == 0, 180, "the outside PostgreSQL")
        wait_for(lambda: docker("exec", f"{name}-s3", "mc", "ready", "local", check=False).returncode == 0, 180,
                 "the outside S3 store")
        # As on a managed service: a role that owns its database and may create databases, no superuser.
        admin_psql(stores, f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{stores['password']}'")
        admin_psql(stores, f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        yield stores
    finally:
        for suffix in ("pg", "s3"):
            docker("rm", "-f", "-v", f"{name}-{suffix}", check=False)


def admin_psql(stores: dict, sql: str, db: str = "postgres") -> str:
    # On the server's own socket, where the image trusts local connections.
    return docker("exec", f"{stores['name']}-pg", "psql", "-U", "postgres", "-d", db,
                  "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout.strip()


def outside_s3(stores: dict):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://{stores['gateway']}:{stores['s3_port']}",
                        aws_access_key_id=stores["access_key"], aws_secret_access_key=stores["secret_key"],
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))


def bucket_keys(stores: dict) -> set[str]:
    pages = outside_s3(stores).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def write_env(stack, values: dict[str, str]) -> None:
    """Into .env: the stores' location is read from there only, never from the shell."""
    if not stack.env_file.exists():
        envfile.ensure(stack.env_file)
    text = stack.env_file.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"^{key}=.*$", lambda _m: f"{key}={value}", text, flags=re.M)
        assert count == 1, key
    stack.env_file.write_text(text)


def settings_for(stores: dict, **wrong: str) -> dict[str, str]:
    return {
        "POSTGRES_HOST": stores["gateway"], "POSTGRES_PORT": str(stores["pg_port"]),
        "POSTGRES_USER": ROLE, "POSTGRES_DB": DATABASE, "POSTGRES_PASSWORD": stores["password"],
        "S3_ENDPOINT_URL": f"http://{stores['gateway']}:{stores['s3_port']}",
        "MINIO_ROOT_USER": stores["access_key"], "MINIO_ROOT_PASSWORD": stores["secret_key"],
        "MLFLOW_BUCKET": BUCKET, **wrong,
    }


@pytest.fixture(scope="module")
def stack(standins, outside, tmp_path_factory):
    """This module's own deployment, on the outside stores (deployed by the first test)."""
    the_stack = new_stack(standins, tmp_path_factory.mktemp("external"), "mlflowext")
    with stack_lifetime(the_stack, deploy=False) as own:
        yield own


def started_at(container: str) -> str:
    return docker("inspect", "--format", "{{.State.StartedAt}}", container).stdout.strip()


def services(stack) -> set[str]:
    return {line for line in stack.compose("ps", "-a", "--format", "{{.Service}}").stdout.split() if line}


def test_wrong_credentials_stop_the_deploy_before_anything_starts(stack, outside):
    write_env(stack, settings_for(outside, POSTGRES_PASSWORD="not-" + outside["password"],
                                  MINIO_ROOT_PASSWORD="not-" + outside["secret_key"]))
    result = stack.script("stack_deploy.sh", "--yes", check=False)
    assert result.returncode != 0
    where = f"{outside['gateway']}:{outside['pg_port']}"
    assert f"PostgreSQL at {where} refused the role '{ROLE}' with POSTGRES_PASSWORD" in result.stderr, result.stderr
    assert f"the S3 store at http://{outside['gateway']}:{outside['s3_port']} refused MINIO_ROOT_USER" in result.stderr
    assert "nothing was started" in result.stderr
    assert services(stack) == set()
    for secret in (outside["password"], outside["secret_key"]):
        assert secret not in result.stdout + result.stderr


def test_the_stack_runs_on_the_outside_stores(stack, outside, tmp_path):
    write_env(stack, settings_for(outside))
    stack.deploy()
    assert "Checking the stores outside the stack: postgres s3" in stack.deploy_output
    # A stock PostgreSQL allows 100 connections; the stack's pools may take 110 at their worst: said, not refused.
    assert "check-stores: warning: PostgreSQL at" in stack.deploy_output and "allows 100 connections" in \
        stack.deploy_output, stack.deploy_output[-3000:]
    assert {"db", "minio"} & services(stack) == set()
    assert {"mlflow", "nginx", "migrate", "bucket-init"} <= services(stack)

    run = tmp_path / "run.json"
    stack.client("write", str(run), "--blob-mib", "3")
    stack.client("read", str(run))
    want = json.loads(run.read_text())
    # Read in the stores themselves, not through the stack.
    assert admin_psql(outside, f"SELECT count(*) FROM metrics WHERE run_uuid = '{want['run_id']}' AND key = 'loss'",
                      db=DATABASE) == str(len(want["losses"]))
    prefix = "artifacts/" + want["artifact_uri"].split("mlflow-artifacts:", 1)[1].strip("/") + "/"
    keys = bucket_keys(outside)
    assert {prefix + path for path in want["artifacts"]} <= keys, sorted(keys)[:10]
    assert admin_psql(outside, f"SELECT count(*) FROM pg_database WHERE datname = '{DATABASE}_auth'") == "1"

    # nginx's S3 port has nothing to serve: it says where the artifacts are.
    answer = stack.http("GET", "/", base=f"https://localhost:{stack.values()['S3_PORT']}", auth=False)
    assert answer.status_code == 404 and outside["gateway"] in answer.text

    shown = stack.script("show_all.sh").stdout
    assert f"{outside['gateway']}:{outside['pg_port']}  (outside the stack: POSTGRES_HOST)" in shown, shown
    assert "(outside the stack: S3_ENDPOINT_URL" in shown and "runs           1 active" in shown, shown

    # A re-deploy changes nothing: the same server and proxy, not restarted (the jobs run again, as always).
    long_running = ("mlflow", "nginx")
    before = {s: (cid, started_at(cid)) for s, cid in stack.container_ids().items() if s in long_running}
    stack.deploy()
    assert {s: (cid, started_at(cid)) for s, cid in stack.container_ids().items() if s in long_running} == before


def test_a_running_stack_is_not_switched_to_its_own_stores_in_place(stack, outside):
    """The backend network would need a route out removed: Compose and Swarm keep an
    existing network as it is, so the deploy stops and says to take the stack down first."""
    running = stack.container_ids()["mlflow"]
    saved = stack.env_file.read_text()
    write_env(stack, {"POSTGRES_HOST": "", "S3_ENDPOINT_URL": ""})
    try:
        result = stack.script("stack_deploy.sh", "--yes", check=False)
    finally:
        stack.env_file.write_text(saved)
    assert result.returncode != 0 and "take the stack down first with ./stack_remove.sh" in result.stderr, \
        result.stderr[-3000:]
    assert stack.container_ids()["mlflow"] == running and {"db", "minio"} & services(stack) == set()


def test_backup_and_restore_go_through_the_outside_stores(stack, outside, tmp_path):
    first = tmp_path / "first.json"
    stack.environ["E2E_EXPERIMENT"] = "ext-backup"
    stack.client("write", str(first), "--blob-mib", "2")
    result = stack.script("db/db_volume_backup.sh")
    backup_set = Path(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((backup_set / "manifest.json").read_text())
    runs_then, keys_then = admin_psql(outside, "SELECT count(*) FROM runs", db=DATABASE), bucket_keys(outside)
    assert manifest["tables"]["runs"] == int(runs_then) and set(manifest["objects"]["sha256"]) == keys_then

    cold = stack.script("db/db_volume_backup.sh", "--cold", check=False)
    assert cold.returncode != 0 and "names a store outside the stack" in cold.stderr, cold.stderr
    assert "mlflow" in stack.compose("ps", "--status", "running", "--services").stdout.split()

    later = tmp_path / "later.json"
    stack.client("write", str(later), "--blob-mib", "1")
    later_run = json.loads(later.read_text())["run_id"]
    assert admin_psql(outside, f"SELECT count(*) FROM runs WHERE run_uuid = '{later_run}'", db=DATABASE) == "1"

    stack.script("db/db_volume_restore.sh", str(backup_set), "--yes")
    assert admin_psql(outside, "SELECT count(*) FROM runs", db=DATABASE) == runs_then
    assert admin_psql(outside, f"SELECT count(*) FROM runs WHERE run_uuid = '{later_run}'", db=DATABASE) == "0"
    assert bucket_keys(outside) == keys_then
    stack.client("read", str(first))


def test_removing_the_stack_leaves_the_outside_stores_alone(stack, outside):
    runs = admin_psql(outside, "SELECT count(*) FROM runs", db=DATABASE)
    keys = bucket_keys(outside)
    stack.script("stack_remove.sh", "--purge", "--yes")
    assert services(stack) == set()
    assert admin_psql(outside, "SELECT count(*) FROM runs", db=DATABASE) == runs != "0"
    assert bucket_keys(outside) == keys
