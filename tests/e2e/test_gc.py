"""Garbage collection on the shared stack: ./stack_gc.sh (dry run, default age,
a collection that waits for a running backup) and the scheduled `gc` service.
Everything is checked where it lives: rows in PostgreSQL, objects in the bucket.
Only this module's own runs are ever deleted, so the stack stays shareable."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from stack import compose

from .conftest import wait_for
from .test_stack import s3_client

LOCK = "SELECT pg_advisory_lock(x'6D6C666C'::int)"  # stack.common.MAINTENANCE_LOCK


@pytest.fixture(scope="module")
def logged(stack, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gc") / "logged.json"
    stack.client(str(out), uuid.uuid4().hex[:8], script="gc_client.py", timeout=600)
    return json.loads(out.read_text())


def rows(stack, run: dict) -> int:
    return int(stack.psql(f"SELECT count(*) FROM runs WHERE run_uuid = '{run['run_id']}'"))


def objects(stack, run: dict) -> int:
    prefix = "artifacts/" + run["artifact_uri"].split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    listed = s3_client(stack).list_objects_v2(Bucket=stack.values()["MLFLOW_BUCKET"], Prefix=prefix)
    return len(listed.get("Contents", []))


def state(stack, logged) -> dict:
    return {name: (rows(stack, run), objects(stack, run)) for name, run in logged.items()}


def test_a_dry_run_lists_what_would_go_and_changes_nothing(stack, logged):
    before = state(stack, logged)
    assert before == {name: (1, 1) for name in logged}
    out = stack.script("stack_gc.sh", "--dry-run", "--older-than", "0").stdout
    assert f"would remove run {logged['drop-now']['run_id']}" in out
    assert f"would remove run {logged['gone']['run_id']}" in out
    assert f"would remove experiment {logged['gone']['experiment_id']}" in out
    assert logged["keep"]["run_id"] not in out and logged["drop-later"]["run_id"] not in out
    assert "dry run, nothing changed" in out
    assert state(stack, logged) == before


def test_the_default_age_keeps_what_was_deleted_just_now(stack, logged):
    before = state(stack, logged)
    out = stack.script("stack_gc.sh").stdout
    assert logged["drop-now"]["run_id"] not in out
    assert "deleted more than 30 days ago" in out
    assert state(stack, logged) == before


def test_a_collection_waits_for_a_running_backup_then_removes_rows_and_objects(stack, logged):
    # A backup holds the maintenance lock for its whole run; hold it the same way.
    argv, environ = compose.invocation(stack.environ)
    values = stack.values()
    holder = subprocess.Popen([*argv, "exec", "-T", "db", "psql", "-U", values["POSTGRES_USER"], "-d",
                               values["POSTGRES_DB"], "-c", LOCK, "-c", "SELECT pg_sleep(8)"],
                              env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stack.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == "1",
                 30, "the stand-in backup to hold the maintenance lock", interval=0.5)
        result = stack.script("stack_gc.sh", "--older-than", "0")
    finally:
        holder.communicate(timeout=60)
    assert "waiting for the running backup or garbage collection to finish" in result.stderr
    assert holder.returncode == 0
    after = state(stack, logged)
    assert after["drop-now"] == (0, 0) and after["gone"] == (0, 0)
    assert after["keep"] == (1, 1) and after["drop-later"] == (1, 1)
    experiment = logged["gone"]["experiment_id"]
    assert stack.psql(f"SELECT count(*) FROM experiments WHERE experiment_id = {experiment}") == "0"


def test_the_scheduled_job_collects_by_itself(stack, logged):
    run = logged["drop-later"]
    response = stack.http("POST", "/api/2.0/mlflow/runs/delete", json={"run_id": run["run_id"]})
    assert response.status_code == 200, response.text
    scheduled = {"COMPOSE_PROFILES": "gc", "GC_OLDER_THAN_DAYS": "0.00001", "GC_INTERVAL_HOURS": "0.01"}
    try:
        # The deploy waits until gc is healthy, i.e. its first collection has finished.
        stack.deploy(extra=scheduled)
        wait_for(lambda: state(stack, {"drop-later": run})["drop-later"] == (0, 0), 120,
                 "the scheduled collection to remove the deleted run")
        assert state(stack, {"keep": logged["keep"]}) == {"keep": (1, 1)}
        logs = stack.compose("--profile", "gc", "logs", "--no-color", "gc").stdout
        assert f"gc: removed run {run['run_id']}" in logs
        shown = stack.script("show_all.sh", extra=scheduled).stdout
        assert "gc             every 0.01 h, deletions older than 0.00001 days, health=healthy" in shown, shown
    finally:
        stack.compose("--profile", "gc", "rm", "--stop", "--force", "gc", check=False)
