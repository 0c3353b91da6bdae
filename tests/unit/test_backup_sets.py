"""Backup sets without a stack: manifest checks, damage detection, retention."""

import hashlib
import importlib.util
import json

import pytest

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("backup", ROOT / "db" / "backup.py")
backup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(backup)


def make_set(root, name, kind="manual", files=None):
    partial = root / f".{name}.partial"
    partial.mkdir(parents=True)
    files = files or {"db.dump": b"PGDMP fake dump", "bucket.tar": b"x" * 4096, "versions.json": b"{}"}
    for fname, data in files.items():
        (partial / fname).write_bytes(data)
    manifest = {"format": backup.FORMAT, "kind": kind, "tables": {"runs": 3, "experiments": 2},
                "objects": {"count": 1, "bytes": 4096, "sha256": {"k": "0" * 64}},
                "files": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
    return backup._finish(partial, manifest, root, name)


def test_a_whole_set_verifies(tmp_path):
    s = make_set(tmp_path, "mlflow-backup-20260101T000000Z")
    assert backup.verify(s)["tables"]["runs"] == 3
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "bucket.tar").write_bytes(b"x" * 100), "bucket.tar is damaged"),
    (lambda s: (s / "db.dump").write_bytes(b"PGDMP fake dumq"), "db.dump is damaged"),
    (lambda s: (s / "db.dump").unlink(), "db.dump is missing"),
    (lambda s: (s / "manifest.json").write_text((s / "manifest.json").read_text().replace('"runs": 3', '"runs": 4')),
     "manifest.json does not match"),
    (lambda s: (s / "manifest.sha256").unlink(), "has no manifest"),
])
def test_damaged_or_partial_sets_are_refused_with_the_reason(tmp_path, damage, message):
    s = make_set(tmp_path, "mlflow-backup-20260101T000000Z")
    damage(s)
    with pytest.raises(backup.BackupError, match=message):
        backup.verify(s)


def test_manifest_of_another_format_is_refused(tmp_path):
    s = make_set(tmp_path, "mlflow-backup-20260101T000000Z")
    manifest = json.loads((s / "manifest.json").read_text())
    manifest["format"] = 99
    text = json.dumps(manifest)
    (s / "manifest.json").write_text(text)
    (s / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest())
    with pytest.raises(backup.BackupError, match="format 99"):
        backup.verify(s)


def test_not_a_folder(tmp_path):
    with pytest.raises(backup.BackupError, match="not a backup set folder"):
        backup.verify(tmp_path / "nothing-here")


def test_keep_two_after_three_leaves_the_two_newest_and_spares_other_kinds(tmp_path):
    names = [f"mlflow-backup-2026010{i}T000000Z" for i in (1, 2, 3)]
    for n in names:
        make_set(tmp_path, n)
    safety = make_set(tmp_path, "mlflow-backup-20251231T000000Z-pre-restore")
    scheduled = make_set(tmp_path, "mlflow-backup-20251230T000000Z-scheduled")
    removed = backup.rotate(2, None, tmp_path)
    assert [p.name for p in removed] == [names[0]]
    left = {p.name for p in backup.list_sets(tmp_path)}
    assert left == {names[1], names[2], safety.name, scheduled.name}


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(backup.BackupError, match="1 or more"):
        backup.rotate(0, None, tmp_path)


def test_partial_sets_are_invisible_to_listing_and_rotation(tmp_path):
    (tmp_path / ".mlflow-backup-20260101T000000Z.partial").mkdir()
    make_set(tmp_path, "mlflow-backup-20260102T000000Z")
    assert [p.name for p in backup.list_sets(tmp_path)] == ["mlflow-backup-20260102T000000Z"]


def test_health_reports_the_age_of_the_last_good_backup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKUP_INTERVAL_HOURS", "1")
    assert backup.health(tmp_path) == 1
    (tmp_path / backup.LAST_GOOD).write_text(f"{backup.time.time() - 1800:.0f} set\n")
    assert backup.health(tmp_path) == 0
    assert "0.5 h ago" in capsys.readouterr().out
    (tmp_path / backup.LAST_GOOD).write_text(f"{backup.time.time() - 3 * 3600:.0f} set\n")
    assert backup.health(tmp_path) == 1


def test_the_last_good_backup_is_a_metric_for_the_textfile_collector(tmp_path):
    backup.write_metrics(tmp_path, 1_700_000_000.4, 86_400)
    text = (tmp_path / backup.METRICS_FILE).read_text()
    assert "mlflow_stack_backup_last_good_timestamp_seconds 1700000000\n" in text
    assert "mlflow_stack_backup_interval_seconds 86400\n" in text
    assert (tmp_path / backup.METRICS_FILE).stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [backup.METRICS_FILE]


@pytest.mark.parametrize("fails, sessions, calls", [
    (False, "0", [("dropdb", "--if-exists", "db1")]),
    # Sessions still connected: FORCE ends them (the stack's own role may).
    (True, "2", [("dropdb", "--if-exists", "db1"), ("psql",), ("dropdb", "--if-exists", "--force", "db1")]),
])
def test_a_database_is_dropped_without_force_first(monkeypatch, fails, sessions, calls):
    made = []

    def pg(*args, db=None, **kw):
        made.append(args[:1] if args[0] == "psql" else args)
        if args[0] == "psql":
            return sessions
        if len(made) == 1 and fails:
            raise backup.BackupError("dropdb failed: ERROR:  la base de données « db1 » est utilisée")
        return ""

    monkeypatch.setattr(backup, "pg", pg)
    backup.drop_database("db1")
    assert made == calls


def test_another_failure_to_drop_a_database_is_not_forced(monkeypatch):
    """FORCE cannot end an autovacuum worker for a role that is not a superuser: it is used
    only for client sessions still connected."""
    made = []

    def pg(*args, db=None, **kw):
        made.append(args[:1] if args[0] == "psql" else args)
        if args[0] == "psql":
            return "0"
        raise backup.BackupError("dropdb failed: permission denied")

    monkeypatch.setattr(backup, "pg", pg)
    with pytest.raises(backup.BackupError, match="permission denied"):
        backup.drop_database("db1")
    assert made == [("dropdb", "--if-exists", "db1"), ("psql",)]
