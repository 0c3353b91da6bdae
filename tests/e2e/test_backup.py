"""Backups end to end: round trip through wiped volumes, damaged sets, retention.

Runs after test_stack.py on the same deployment (see MODULE_ORDER).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

PREFIX = "bk"


def sets(stack, pattern="mlflow-backup-*"):
    root = Path(stack.environ["BACKUP_DIR"])
    return sorted(p.name for p in root.glob(pattern) if p.is_dir())


def backup(stack, *args) -> Path:
    result = stack.script("db/db_volume_backup.sh", *args)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_dir() and (path / "manifest.json").exists(), result.stdout
    return path


@pytest.fixture(scope="module")
def workload(stack):
    stack.client("write", PREFIX, script="workload.py")
    snap = stack.workdir / "before.json"
    stack.client("snapshot", PREFIX, str(snap), script="workload.py")
    return json.loads(snap.read_text())


@pytest.fixture(scope="module")
def round_trip_set(stack, workload):
    """A backup taken while another client keeps logging."""
    stop = stack.workdir / "stop-logger"
    logger = stack.client_popen("logger", "live-writer", str(stop), script="workload.py")
    try:
        time.sleep(3)  # the logger is mid-stream when the backup starts
        path = backup(stack)
        time.sleep(2)
    finally:
        stop.touch()
        out, err = logger.communicate(timeout=120)
    assert logger.returncode == 0, err[-3000:]
    logged = re.search(r"^logger: (\d+) runs$", out, re.M)
    assert logged and int(logged.group(1)) > 0, f"the concurrent logger logged nothing: {out[-500:]}"
    return path


def test_backup_set_is_complete_and_described(stack, workload, round_trip_set):
    manifest = json.loads((round_trip_set / "manifest.json").read_text())
    assert set(manifest["files"]) == {"db.dump", "auth.dump", "bucket.tar", "versions.json"}
    assert manifest["auth_tables"]["users"] >= 1  # the user store is in the set too
    assert manifest["tables"]["runs"] >= 7  # 6 workload runs + the model run (+ live ones)
    assert manifest["tables"]["model_versions"] >= 1
    assert manifest["objects"]["count"] >= 7
    assert manifest["objects"]["bytes"] > 25 << 20
    versions = json.loads((round_trip_set / "versions.json").read_text())
    assert versions["mlflow"] == manifest["mlflow_version"]
    assert re.fullmatch(r"3\.\d+\.\d+", versions["mlflow"]), versions["mlflow"]
    assert versions["alembic_version"] and versions["images"]["mlflow"].startswith("mlflow-stack/mlflow:")


def test_round_trip_through_wiped_volumes_restores_everything(stack, workload, round_trip_set):
    stack.script("stack_remove.sh", "--purge", "--yes")
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                              f"label=com.docker.compose.project={stack.project}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert volumes == [], "purge left volumes behind"
    stack.deploy()
    assert stack.psql("SELECT count(*) FROM runs") == "0", "the fresh stack is not empty"

    result = stack.script("db/db_volume_restore.sh", str(round_trip_set), "--yes")
    assert "all match the manifest" in result.stderr

    after = stack.workdir / "after.json"
    stack.client("snapshot", PREFIX, str(after), script="workload.py")
    assert json.loads(after.read_text()) == workload
    # Every run the dump holds as finished has its artifact: the bucket was
    # copied after the dump, so the set never lacks an object it references.
    stack.client("check-complete", "live-writer", script="workload.py")
    predictions = stack.client("predict", f"{PREFIX}-model", "1", script="workload.py").stdout
    assert len(json.loads(predictions.strip().splitlines()[-1])) == 3


@pytest.mark.parametrize("damage", ["flip-a-byte-in-db.dump", "truncate-bucket.tar", "drop-manifest"])
def test_a_damaged_set_is_refused_and_changes_nothing(stack, workload, round_trip_set, damage):
    bad = stack.workdir / f"damaged-{damage}" / round_trip_set.name
    bad.parent.mkdir()
    subprocess.run(["cp", "-a", str(round_trip_set), str(bad)], check=True)
    if damage == "flip-a-byte-in-db.dump":
        data = bytearray((bad / "db.dump").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "db.dump").write_bytes(data)
    elif damage == "truncate-bucket.tar":
        with open(bad / "bucket.tar", "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
    else:
        (bad / "manifest.json").unlink()
    runs_before = stack.psql("SELECT count(*) FROM runs")
    ids_before = stack.container_ids()
    result = stack.script("db/db_volume_restore.sh", str(bad), "--yes", check=False)
    assert result.returncode != 0
    expected = {"flip-a-byte-in-db.dump": "db.dump is damaged", "truncate-bucket.tar": "bucket.tar is damaged",
                "drop-manifest": "has no manifest"}[damage]
    assert expected in result.stderr and "nothing was changed" in result.stderr, result.stderr[-2000:]
    assert stack.psql("SELECT count(*) FROM runs") == runs_before
    assert stack.container_ids() == ids_before
    after = stack.workdir / f"after-{damage}.json"
    stack.client("snapshot", PREFIX, str(after), script="workload.py")
    assert json.loads(after.read_text()) == workload


def test_keep_two_after_three_backups_leaves_the_two_newest(stack, workload):
    before = sets(stack)
    made = [backup(stack, "--keep", "2").name for _ in range(3)]
    manual = [n for n in sets(stack) if n.endswith("Z")]
    assert manual == made[1:], (before, made, manual)
    # Safety sets taken before the restore are never rotated away.
    assert [n for n in before if n.endswith("-pre-restore")] == sets(stack, "*-pre-restore")


def test_cold_backup_and_restore_round_trip(stack, workload):
    path = backup(stack, "--cold")
    assert path.name.endswith("-cold")
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"db-data.tar", "minio-data.tar"}
    out = stack.compose("ps", "--status", "running", "--services").stdout.split()
    assert {"db", "minio", "mlflow", "nginx"} <= set(out), "the stack was not started again"
    # Something logged after the cold copy disappears when the copy is restored.
    stack.client("write", str(stack.workdir / "after-cold-run.json"), "--blob-mib", "1",
                 extra={"E2E_EXPERIMENT": "after-cold"})
    stack.script("db/db_volume_restore.sh", str(path), "--yes")
    assert stack.psql("SELECT count(*) FROM experiments WHERE name = 'after-cold'") == "0"
    after = stack.workdir / "after-cold.json"
    stack.client("snapshot", PREFIX, str(after), script="workload.py")
    assert json.loads(after.read_text()) == workload


def test_scheduled_backups_run_and_show_their_age(stack, workload):
    scheduled = {"COMPOSE_PROFILES": "backup", "BACKUP_INTERVAL_HOURS": "0.01", "BACKUP_KEEP": "5"}
    stack.deploy(extra=scheduled)  # waits until the backup service is healthy: its first set exists
    try:
        first = sets(stack, "*-scheduled")
        assert first, "the healthy backup service has written no set"
        deadline = time.time() + 240
        while time.time() < deadline and len(sets(stack, "*-scheduled")) <= len(first):
            time.sleep(5)
        made = sets(stack, "*-scheduled")
        assert len(made) > len(first), "no further scheduled backup after one interval"
        manifest = json.loads((Path(stack.environ["BACKUP_DIR"]) / made[-1] / "manifest.json").read_text())
        assert manifest["kind"] == "scheduled" and manifest["tables"]["runs"] >= 7
        out = stack.script("show_all.sh", extra=scheduled).stdout
        assert re.search(r"scheduled\s+every 0\.01 h, health=healthy: last good backup 0\.\d h ago", out), out
        assert re.search(r"latest set\s+mlflow-backup-\d{8}T\d{6}Z-scheduled", out), out
    finally:
        stack.compose("rm", "--stop", "--force", "backup", check=False)
