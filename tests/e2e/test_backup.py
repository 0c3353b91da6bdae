"""Backups end to end: round trip through wiped volumes, damaged sets, retention.

On a stack of its own (the `stack` fixture below), so the data is exactly what
this module logged.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from . import gateway
from .conftest import new_stack, stack_lifetime, wait_for

pytestmark = pytest.mark.slow

PREFIX = "bk"  # the workload's experiments are bk-0..bk-2, its model bk-model
LIVE = "bk_live-writer"  # the concurrent logger's experiment (outside the bk-* snapshot)
WORKLOAD_RUNS = 7  # 3 experiments x 2 runs, and the model's run


@pytest.fixture(scope="module")
def stack(standins, tmp_path_factory):
    """This module's own deployment, in place of the shared one.

    These tests purge the volumes and restore older sets, so on the shared stack
    they would wipe whatever other modules logged after the set was taken. Giving
    them their own stack costs one more deploy and removal in a full run (under a
    minute on a 2-core machine once the images are built; test_security.py alone,
    deploy included, took 68 s) and nothing extra when the module runs alone. The
    alternative, sharing the stack and having every other module re-create its
    data lazily, saves that deploy but is no cheaper: every set, restore and cold
    copy here would then carry the other modules' data (test_stack.py leaves a
    320 MiB artifact; this module makes about nine sets and two restores), and the
    counts here could only be lower bounds. Here they are exact: the stack holds
    this module's data and nothing else.
    """
    with stack_lifetime(new_stack(standins, tmp_path_factory.mktemp("backup-stack"), "mlflowbk")) as own:
        yield own


def live_runs(stack) -> int:
    """Runs (any status) the concurrent logger has created so far, counted in PostgreSQL."""
    out = stack.psql(f"SELECT count(*) FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                     f"WHERE e.name = '{LIVE}'")
    return int(out or 0)


def sets(stack, pattern="mlflow-backup-*"):
    root = Path(stack.environ["BACKUP_DIR"])
    return sorted(p.name for p in root.glob(pattern) if p.is_dir())


def backup(stack, *args) -> Path:
    result = stack.script("db/db_volume_backup.sh", *args)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_dir() and (path / "manifest.json").exists(), result.stdout
    return path


GATEWAY_SECRET = ("bk-openai", "sk-backup-round-trip-0123456789")


@pytest.fixture(scope="module")
def workload(stack):
    stack.client("write", PREFIX, script="workload.py")
    gateway.create(stack, *GATEWAY_SECRET)
    snap = stack.workdir / "before.json"
    stack.client("snapshot", PREFIX, str(snap), script="workload.py")
    return json.loads(snap.read_text())


@pytest.fixture(scope="module")
def round_trip_set(stack, workload):
    """A backup taken while another client keeps logging: it has logged runs before
    the backup starts and logs more after the backup is complete."""
    stop = stack.workdir / "stop-logger"
    logger = stack.client_popen("logger", LIVE, str(stop), script="workload.py")
    try:
        def logged_more_than(n: int) -> int:
            assert logger.poll() is None, f"the concurrent logger exited: {logger.communicate()[1][-3000:]}"
            count = live_runs(stack)
            return count if count > n else 0

        started_with = wait_for(lambda: logged_more_than(2), 180, "the concurrent logger to create 3 runs")
        path = backup(stack)
        ended_with = live_runs(stack)
        wait_for(lambda: logged_more_than(ended_with), 120, "the logger to go on logging after the backup")
    finally:
        stop.touch()
        out, err = logger.communicate(timeout=120)
    assert logger.returncode == 0, err[-3000:]
    logged = re.search(r"^logger: (\d+) runs$", out, re.M)
    assert logged and int(logged.group(1)) > ended_with, f"the concurrent logger stopped early: {out[-500:]}"
    return {"path": path, "live_at_start": started_with, "live_at_end": ended_with}


def test_backup_set_is_complete_and_described(stack, workload, round_trip_set):
    path = round_trip_set["path"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"db.dump", "auth.dump", "bucket.tar", "versions.json"}
    assert manifest["auth_tables"]["users"] >= 1  # the user store is in the set too
    # The dump was taken while the logger ran: it holds the workload and some, not all, live runs.
    live_in_set = manifest["tables"]["runs"] - WORKLOAD_RUNS
    assert round_trip_set["live_at_start"] <= live_in_set <= round_trip_set["live_at_end"], \
        (manifest["tables"]["runs"], round_trip_set)
    assert manifest["tables"]["experiments"] == 5  # Default, bk-0..bk-2 and the live writer's
    assert manifest["tables"]["registered_models"] == 1 and manifest["tables"]["model_versions"] == 1
    # Every artifact the workload logged is in the set, with the sha256 a client read back.
    digests = manifest["objects"]["sha256"]
    expected = {f"artifacts/{exp['id']}/{run_id}/artifacts/{name}": digest
                for key, exp in workload.items() if key != "models"
                for run_id, run in exp["runs"].items() for name, digest in run["artifacts"].items()}
    assert len(expected) == 7  # six reports and the checkpoint
    assert {key: digests.get(key) for key in expected} == expected
    assert manifest["objects"]["count"] == len(digests) > len(expected)  # and the model's and live runs' files
    assert manifest["objects"]["bytes"] > 25 << 20
    versions = json.loads((path / "versions.json").read_text())
    assert versions["mlflow"] == manifest["mlflow_version"]
    assert re.fullmatch(r"3\.\d+\.\d+", versions["mlflow"]), versions["mlflow"]
    assert versions["alembic_version"] and versions["images"]["mlflow"].startswith("mlflow-stack/mlflow:")


def test_round_trip_through_wiped_volumes_restores_everything(stack, workload, round_trip_set):
    path = round_trip_set["path"]
    stack.script("stack_remove.sh", "--purge", "--yes")
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                              f"label=com.docker.compose.project={stack.project}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert volumes == [], "purge left volumes behind"
    stack.deploy()
    assert stack.psql("SELECT count(*) FROM runs") == "0", "the fresh stack is not empty"

    result = stack.script("db/db_volume_restore.sh", str(path), "--yes")
    assert "all match the manifest" in result.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert int(stack.psql("SELECT count(*) FROM runs")) == manifest["tables"]["runs"]

    after = stack.workdir / "after.json"
    stack.client("snapshot", PREFIX, str(after), script="workload.py")
    assert json.loads(after.read_text()) == workload
    # Every run the dump holds as finished has its artifact: the bucket was
    # copied after the dump, so the set never lacks an object it references.
    checked = stack.client("check-complete", LIVE, script="workload.py").stdout
    assert f"check-complete: {manifest['tables']['runs'] - WORKLOAD_RUNS} runs," in checked, checked
    predictions = stack.client("predict", f"{PREFIX}-model", "1", script="workload.py").stdout
    assert len(json.loads(predictions.strip().splitlines()[-1])) == 3
    # The AI gateway's stored secret still decrypts (same installation, same key).
    name, value = GATEWAY_SECRET
    assert gateway.read_back(stack, name) == {"value": {"api_key": value}, "builtin_key": "refused"}


@pytest.mark.parametrize("damage", ["flip-a-byte-in-db.dump", "truncate-bucket.tar", "drop-manifest"])
def test_a_damaged_set_is_refused_and_changes_nothing(stack, workload, round_trip_set, damage):
    bad = stack.workdir / f"damaged-{damage}" / round_trip_set["path"].name
    bad.parent.mkdir()
    subprocess.run(["cp", "-a", str(round_trip_set["path"]), str(bad)], check=True)
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
                 extra={"E2E_EXPERIMENT": "bk_after-cold"})
    assert stack.psql("SELECT count(*) FROM experiments WHERE name = 'bk_after-cold'") == "1"
    stack.script("db/db_volume_restore.sh", str(path), "--yes")
    assert stack.psql("SELECT count(*) FROM experiments WHERE name = 'bk_after-cold'") == "0"
    after = stack.workdir / "after-cold.json"
    stack.client("snapshot", PREFIX, str(after), script="workload.py")
    assert json.loads(after.read_text()) == workload


def test_scheduled_backups_run_and_show_their_age(stack, workload):
    scheduled = {"COMPOSE_PROFILES": "backup", "BACKUP_INTERVAL_HOURS": "0.01", "BACKUP_KEEP": "5"}
    stack.deploy(extra=scheduled)  # waits until the backup service is healthy: its first set exists
    try:
        first = sets(stack, "*-scheduled")
        assert first, "the healthy backup service has written no set"
        made = wait_for(lambda: len(now := sets(stack, "*-scheduled")) > len(first) and now,
                        240, "a further scheduled backup after one interval (0.01 h)", interval=5)
        manifest = json.loads((Path(stack.environ["BACKUP_DIR"]) / made[-1] / "manifest.json").read_text())
        # Nothing logs meanwhile: the set holds exactly the runs PostgreSQL has.
        runs = int(stack.psql("SELECT count(*) FROM runs"))
        assert manifest["kind"] == "scheduled" and manifest["tables"]["runs"] == runs >= WORKLOAD_RUNS
        out = stack.script("show_all.sh", extra=scheduled).stdout
        assert re.search(r"scheduled\s+every 0\.01 h, health=healthy: last good backup 0\.\d h ago", out), out
        assert re.search(r"latest set\s+mlflow-backup-\d{8}T\d{6}Z-scheduled", out), out
    finally:
        stack.compose("rm", "--stop", "--force", "backup", check=False)


def test_a_different_gateway_key_is_refused_and_loses_nothing(stack, workload):
    """What a restore into an installation with another MLFLOW_CRYPTO_KEK_PASSPHRASE
    meets: the deploy stops at the migrate job, naming the secret and the fix, and
    nothing changes; with the right passphrase back, everything decrypts."""
    name, value = GATEWAY_SECRET
    original = stack.env_file.read_text()
    other = re.sub(r"(?m)^MLFLOW_CRYPTO_KEK_PASSPHRASE=.*$", "MLFLOW_CRYPTO_KEK_PASSPHRASE=" + "another-installation-" * 2,
                   original)
    assert other != original
    stack.env_file.write_text(other)
    try:
        refused = stack.script("stack_deploy.sh", "--yes", check=False)
    finally:
        stack.env_file.write_text(original)
    assert refused.returncode != 0
    assert f"({name}) are encrypted under a passphrase other than this installation's" in refused.stderr
    assert "Nothing was changed" in refused.stderr
    stack.deploy()
    assert gateway.read_back(stack, name) == {"value": {"api_key": value}, "builtin_key": "refused"}
