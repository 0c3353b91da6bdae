"""Garbage collection on the shared stack: ./stack_gc.sh (dry run, default age,
a collection that waits while a backup holds the maintenance lock, a backup that
waits for it) and the scheduled `gc` service. Everything is checked where it
lives: rows in PostgreSQL, objects in the bucket.

Collections here take everything deleted in the shared stack so far: no other
module deletes runs or experiments it still checks, and this module asserts only
on its own (gc-* experiments)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from stack import compose, paths

from .conftest import wait_for
from .test_stack import s3_client

from stack.common import MAINTENANCE_LOCK

WAITING = "waiting for the running backup, restore or garbage collection to finish"


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
    out = stack.script("stack_gc.sh", "--yes").stdout
    assert logged["drop-now"]["run_id"] not in out
    assert "deleted more than 30 days ago" in out
    assert state(stack, logged) == before


class LockHolder:
    """Holds the maintenance lock in a psql session of its own (as a running backup
    does) until release() ends that session."""

    def __init__(self, stack):
        self.stack = stack
        argv, environ = compose.invocation(stack.environ)
        self.proc = subprocess.Popen(
            [*argv, "exec", "-T", "db", "psql", "-U", stack.values()["POSTGRES_USER"], "-d", "postgres",
             "-c", f"SELECT pg_advisory_lock({MAINTENANCE_LOCK})", "-c", "SELECT pg_sleep(600)"],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: self._holders() == "1", 180, "the psql session to hold the maintenance lock", interval=0.5)

    def _holders(self) -> str:
        return self.stack.psql(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                               f"AND objid = {MAINTENANCE_LOCK}")

    def release(self) -> None:
        self.stack.psql(f"SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                        f"AND objid = {MAINTENANCE_LOCK}")
        self.proc.communicate(timeout=60)


def run_until_waiting(stack, *argv: str) -> subprocess.Popen:
    """Start a script; return once it says it waits for the maintenance lock."""
    proc = subprocess.Popen([str(paths.ROOT / argv[0]), *argv[1:]], env=stack.environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []

    def waiting() -> bool:
        line = proc.stderr.readline()
        seen.append(line)
        assert line or proc.poll() is None, f"{argv[0]} ended without waiting: {''.join(seen)[-3000:]}"
        return WAITING in line

    wait_for(waiting, 180, f"{argv[0]} to wait for the maintenance lock", interval=0)
    return proc


def test_a_collection_waits_while_a_backup_runs_then_removes_rows_and_objects(stack, logged):
    holder = LockHolder(stack)
    try:
        gc = run_until_waiting(stack, "stack_gc.sh", "--older-than", "0", "--yes")
        # Still waiting: nothing is gone yet.
        assert state(stack, logged)["drop-now"] == (1, 1)
    finally:
        holder.release()
    out, err = gc.communicate(timeout=300)
    assert gc.returncode == 0, err[-3000:]
    assert f"removed run {logged['drop-now']['run_id']}" in out
    after = state(stack, logged)
    assert after["drop-now"] == (0, 0) and after["gone"] == (0, 0)
    assert after["keep"] == (1, 1) and after["drop-later"] == (1, 1)
    experiment = logged["gone"]["experiment_id"]
    assert stack.psql(f"SELECT count(*) FROM experiments WHERE experiment_id = {experiment}") == "0"


def test_a_backup_waits_while_a_collection_holds_the_lock(stack):
    holder = LockHolder(stack)
    try:
        backup = run_until_waiting(stack, "db/db_volume_backup.sh")
    finally:
        holder.release()
    out, err = backup.communicate(timeout=600)
    assert backup.returncode == 0, err[-3000:]
    assert (Path(out.strip().splitlines()[-1]) / "manifest.json").exists()


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
