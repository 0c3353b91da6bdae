"""The point-in-time tool's decisions without a database: times, which base backup a
restore starts from, when a base backup is due, the recovery settings."""

import datetime as dt
import os
import importlib.util
import re

import pytest

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("pitr", ROOT / "db" / "pitr.py")
pitr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pitr)

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


BACKUPS = [{"id": "20261201T000000", "begin": "2026-12-01T00:00:00+00:00", "end": "2026-12-01T00:00:05+00:00",
            "timeline": 1},
           {"id": "20261202T000000", "begin": "2026-12-02T00:00:00+00:00", "end": "2026-12-02T00:00:05+00:00",
            "timeline": 1}]


@pytest.mark.parametrize("text, want", [
    ("2026-12-06 16:59:30", "2026-12-06 16:59:30"),
    ("2026-12-06T16:59:30Z", "2026-12-06 16:59:30"),
    ("2026-12-06 17:59:30+01:00", "2026-12-06 16:59:30"),
    ("2026-12-06 11:59:30.250-05:00", "2026-12-06 16:59:30.250"),
])
def test_times_are_utc_unless_they_carry_an_offset(text, want):
    assert pitr.parse_time(text) == at(want)


def test_the_target_reaches_postgresql_with_an_explicit_offset():
    assert pitr.pg_time(pitr.parse_time("2026-12-06 17:59:30.5+01:00")) == "2026-12-06 16:59:30.500000+00"


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01 00:00:00", "", "16:59"])
def test_a_time_that_is_not_one_says_how_to_write_it(text):
    with pytest.raises(pitr.PitrError, match="2026-12-06 16:59:30"):
        pitr.parse_time(text)


def test_barman_times_in_either_form():
    assert pitr.barman_time("Mon Dec  7 07:15:02 2026") == at("2026-12-07 07:15:02")
    assert pitr.barman_time("2026-12-07 07:15:02.123+00:00") == at("2026-12-07 07:15:02.123")


def test_a_restore_starts_from_the_newest_backup_that_ended_before_the_moment():
    now = at("2026-12-03 00:00:00")
    assert pitr.choose(BACKUPS, at("2026-12-02 12:00:00"), now)[0]["id"] == "20261202T000000"
    assert pitr.choose(BACKUPS, at("2026-12-01 12:00:00"), now) == (BACKUPS[0], 1)
    # A backup is consistent only from its end on: a moment inside the second one starts from the first.
    assert pitr.choose(BACKUPS, at("2026-12-02 00:00:02"), now)[0]["id"] == "20261201T000000"


# Timeline 1 from Dec 1; at Dec 2 18:00 a restore went back to Dec 2 06:00 (WAL 0/5000000 of
# timeline 1), and timeline 2 began; a backup of timeline 1 was taken at noon in between,
# one of timeline 2 at 20:00.
HISTORY = {2: {"began": "2026-12-02T18:00:00+00:00", "leaves": {1: 0x5000000}}}
BRANCHED = [{**BACKUPS[0], "end_lsn": "0/2000100"},
            {"id": "T1-noon", "begin": "2026-12-02T12:00:00+00:00", "end": "2026-12-02T12:00:05+00:00",
             "timeline": 1, "end_lsn": "0/7000100"},
            {"id": "T2", "begin": "2026-12-02T20:00:00+00:00", "end": "2026-12-02T20:00:05+00:00",
             "timeline": 2, "end_lsn": "0/9000100"}]


@pytest.mark.parametrize("target, backup, timeline", [
    # Before the restore's target: the same on both timelines; the newest backup on the path.
    ("2026-12-02 05:00:00", "20261201T000000", 1),
    # Between the restore's target and the restore: only the history the restore left has it.
    ("2026-12-02 15:00:00", "T1-noon", 1),
    # After the restore: timeline 2, from a backup of timeline 1 taken before it branched
    # (the noon one holds WAL past the branch point) ...
    ("2026-12-02 19:00:00", "20261201T000000", 2),
    # ... or from timeline 2's own.
    ("2026-12-02 21:00:00", "T2", 2),
])
def test_a_moment_after_an_earlier_restore_is_found_on_the_history_it_was_on(target, backup, timeline):
    chosen, on = pitr.choose(BRANCHED, at(target), at("2026-12-03 00:00:00"), HISTORY)
    assert (chosen["id"], on) == (backup, timeline)


def test_history_files_and_positions_are_read_as_postgresql_writes_them():
    assert pitr.lsn("0/5000000") == 0x5000000 and pitr.lsn("1/A0") == (1 << 32) + 0xA0
    text = "1\t0/5000000\tbefore 2026-12-02 06:00:00+00\n\n2\t0/9000000\tbefore 2026-12-03 06:00:00+00\n"
    assert pitr.parse_history(text) == {1: 0x5000000, 2: 0x9000000}
    assert pitr.timeline_at({}, at("2026-12-02 00:00:00")) == 1


@pytest.mark.parametrize("target, found, says", [
    ("2026-11-30 00:00:00", BACKUPS, "the archive reaches back to 2026-12-01T00:00:05+00:00"),
    ("2026-12-04 00:00:00", BACKUPS, "is in the future"),
    ("2026-12-02 12:00:00", [], "no base backup yet"),
])
def test_a_moment_outside_the_archive_is_refused_with_the_reason(target, found, says):
    with pytest.raises(pitr.PitrError, match=re.escape(says)):
        pitr.choose(found, at(target), at("2026-12-03 00:00:00"))


def test_a_base_backup_is_due_when_none_is_recent_or_it_is_of_an_earlier_timeline(monkeypatch):
    monkeypatch.setenv("PITR_BASE_BACKUP_HOURS", "24")
    assert pitr.backup_due([], 1, at("2026-12-02 01:00:00")) == "there is none yet"
    assert pitr.backup_due(BACKUPS, 1, at("2026-12-02 12:00:00")) == ""
    assert "hours old" in pitr.backup_due(BACKUPS, 1, at("2026-12-03 00:00:06"))
    assert "after a restore" in pitr.backup_due(BACKUPS, 2, at("2026-12-02 12:00:00"))


def test_recovery_settings_replay_the_archive_to_the_moment_then_take_writes():
    text = pitr.recovery_settings("2026-12-06 16:59:30.000000+00", 2, "old-pitr")
    assert "recovery_target_timeline = '2'" in text
    # The bucket restored from (a lost machine's, which the new PITR_BUCKET is not).
    assert "restore_command = 'python3 /usr/local/bin/mlflow-stack-pitr fetch %f %p old-pitr'" in text
    assert "recovery_target_time = '2026-12-06 16:59:30.000000+00'" in text
    assert "recovery_target_action = 'promote'" in text


def test_the_archive_lag_is_the_age_of_the_oldest_segment_waiting(tmp_path):
    status = tmp_path / "pg_wal" / "archive_status"
    status.mkdir(parents=True)
    assert pitr.waiting_segments(tmp_path, 1000.0) == (0, 0.0)
    (status / "000000010000000000000002.done").touch()
    for name, mtime in (("000000010000000000000003.ready", 900.0), ("000000010000000000000004.ready", 970.0)):
        (status / name).touch()
        os.utime(status / name, (mtime, mtime))
    assert pitr.waiting_segments(tmp_path, 1000.0) == (2, 100.0)


def test_metrics_give_the_lag_and_the_newest_base_backup(tmp_path, monkeypatch):
    monkeypatch.setenv("PITR_ARCHIVE_SECONDS", "10")
    monkeypatch.setenv("PITR_BASE_BACKUP_HOURS", "24")
    (tmp_path / "pg_wal" / "archive_status").mkdir(parents=True)
    ready = tmp_path / "pg_wal" / "archive_status" / "000000010000000000000003.ready"
    ready.touch()
    os.utime(ready, (900.0, 900.0))
    text = pitr.metrics_text({"ok": True, "newest": "2026-12-02T00:00:05+00:00"}, tmp_path, 1000.0)
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert values == {"mlflow_stack_pitr_wal_segments_waiting": "1",
                      "mlflow_stack_pitr_oldest_waiting_segment_age_seconds": "100.0",
                      "mlflow_stack_pitr_archive_timeout_seconds": "10.0",
                      "mlflow_stack_pitr_base_backup_interval_seconds": "86400.0",
                      "mlflow_stack_pitr_last_look_ok": "1",
                      "mlflow_stack_pitr_newest_base_backup_timestamp_seconds": str(at("2026-12-02 00:00:05").timestamp())}
    # No base backup yet: no timestamp (PitrBaseBackupTooOld cannot fire on a made-up 0).
    assert "newest_base_backup" not in pitr.metrics_text({"ok": False}, tmp_path, 1000.0)


def test_a_segment_is_never_overwritten_with_other_content(monkeypatch):
    monkeypatch.setenv("PITR_BUCKET", "mlflow-pitr")
    name = "000000010000000000000003"
    assert pitr.overwrite_refusal(name, b"wal", None) == ""
    assert pitr.overwrite_refusal(name, b"wal", b"wal") == ""  # an earlier attempt got there
    refused = pitr.overwrite_refusal(name, b"wal", b"other history")
    assert name in refused and "Nothing was overwritten" in refused and "docs/backups.md" in refused


def test_the_archives_copy_is_found_under_barmans_layout_and_unpacked(monkeypatch):
    import gzip
    import io

    class Store:
        objects = {"stack/wals/0000000100000000/000000010000000000000003.gz": gzip.compress(b"wal"),
                   "stack/wals/0000000100000000/000000010000000000000003.00000028.backup.gz": b"label"}

        def list_objects_v2(self, Bucket, Prefix):
            assert Bucket == "mlflow-pitr"
            return {"Contents": [{"Key": k} for k in self.objects if k.startswith(Prefix)]}

        def get_object(self, Bucket, Key):
            return {"Body": io.BytesIO(self.objects[Key])}

    monkeypatch.setenv("PITR_BUCKET", "mlflow-pitr")
    assert pitr.archived_copy(Store(), "000000010000000000000003") == b"wal"
    assert pitr.archived_copy(Store(), "000000010000000000000004") is None


def test_healthy_while_the_first_base_backup_is_taken_and_not_before(monkeypatch):
    monkeypatch.setenv("PITR_BASE_BACKUP_HOURS", "24")
    now = at("2026-12-07 12:00:00").timestamp()
    assert pitr.state_problem({}, now) == "no look at the archive yet"
    assert pitr.state_problem({"ok": True, "newest": None}, now) == "no base backup yet"
    # A large database's first one may take longer than a deploy waits for the service.
    assert pitr.state_problem({"ok": True, "newest": None, "first_since": now - 3600}, now) == ""
    assert "has run for 25.0 hours" in pitr.state_problem({"ok": True, "newest": None,
                                                            "first_since": now - 25 * 3600}, now)
    assert pitr.state_problem({"ok": False, "error": "the store said no", "first_since": now}, now) == \
        "the store said no"
    assert pitr.state_problem({"ok": True, "newest": "2026-12-07T11:00:00+00:00"}, now) == ""
    assert "hours old" in pitr.state_problem({"ok": True, "newest": "2026-12-04T11:00:00+00:00"}, now)


def test_a_recovery_that_keeps_failing_is_given_up_after_its_restarts(tmp_path, monkeypatch):
    pid = tmp_path / "postmaster.pid"
    assert pitr.postmaster_start(tmp_path) == ""
    starts = iter(["1765100000", "1765100000", "1765100004", "1765100009"])

    def next_start(_pgdata):
        return next(starts, "1765100009")

    monkeypatch.setattr(pitr, "PGDATA", tmp_path)
    monkeypatch.setattr(pitr, "postmaster_start", next_start)
    monkeypatch.setattr(pitr, "query", lambda sql: [[True]] if "is_in_recovery" in sql else [[None]])
    monkeypatch.setattr(pitr.time, "sleep", lambda s: None)
    with pytest.raises(pitr.PitrError, match="started 3 times without finishing its recovery"):
        pitr.cmd_wait_recovered(["60"])
    pid.write_text("42\n/var/lib/postgresql/data\n1765100000\n5432\n")
    monkeypatch.undo()
    assert pitr.postmaster_start(tmp_path) == "1765100000"


def test_a_restore_never_starts_from_a_backup_of_another_database():
    old = [dict(b, systemid="7400000000000000001") for b in BACKUPS]
    # A new machine: its empty database's first backup, then (restored from the old archive,
    # same system identifier) the restored one's.
    fresh = {"id": "20261203T000000", "begin": "2026-12-03T00:00:00+00:00", "end": "2026-12-03T00:00:05+00:00",
             "timeline": 1, "systemid": "7500000000000000002"}
    restored = {"id": "20261203T010000", "begin": "2026-12-03T01:00:00+00:00", "end": "2026-12-03T01:00:05+00:00",
                "timeline": 2, "systemid": "7400000000000000001"}
    assert [b["id"] for b in pitr.of_one_database([*old, fresh, restored])] == [
        "20261201T000000", "20261202T000000", "20261203T010000"]
    assert pitr.of_one_database([]) == []
    # Before the restored database's first backup, the newest is the empty one's: restores of
    # the running (restored) database still start only from its own.
    assert [b["id"] for b in pitr.of_one_database([*old, fresh], "7400000000000000001")] == [
        "20261201T000000", "20261202T000000"]


def test_a_new_empty_database_never_writes_into_another_databases_archive(monkeypatch):
    monkeypatch.setenv("PITR_BUCKET", "mlflow-pitr")
    old = [dict(b, systemid="7400000000000000001") for b in BACKUPS]
    said = pitr.foreign_archive(old, "7500000000000000002", 1)
    assert "holds another database's backups" in said and "--from-archive mlflow-pitr" in said
    assert pitr.foreign_archive(old, "7400000000000000001", 1) == ""      # its own
    assert pitr.foreign_archive([], "7500000000000000002", 1) == ""       # a new archive
    # Restored from another archive (a new timeline): its backups go on there.
    assert pitr.foreign_archive([dict(BACKUPS[0], systemid="75")], "74", 2) == ""


def test_rclone_figures_come_from_its_last_stats_line():
    log = "\n".join([
        '{"level":"info","msg":"exp/1/f: Copied (new)","time":"2026-12-07T15:31:43Z"}',
        '{"level":"info","msg":"Transferred ...","stats":{"bytes":100006,"checks":0,"elapsedTime":0.52,'
        '"transfers":2,"errors":0},"time":"2026-12-07T15:31:44Z"}',
        '2026/12/07 15:31:44 NOTICE: something else',
    ])
    assert pitr.last_stats(log) == {"transfers": 2, "bytes": 100006, "checks": 0, "seconds": 0.52}
    assert pitr.last_stats("") == {"transfers": 0, "bytes": 0, "checks": 0, "seconds": 0.0}


def test_artifacts_are_copied_only_off_the_machine_and_when_due(monkeypatch):
    monkeypatch.setenv("PITR_ARTIFACT_COPY_MINUTES", "15")
    monkeypatch.delenv("PITR_OFF_SITE", raising=False)
    assert not pitr.artifact_copy_due({}, 1000.0)
    monkeypatch.setenv("PITR_OFF_SITE", "true")
    assert pitr.artifact_copy_due({}, 1000.0)
    assert not pitr.artifact_copy_due({"artifacts": {"at": 1000.0}}, 1000.0 + 14 * 60)
    assert pitr.artifact_copy_due({"artifacts": {"at": 1000.0}}, 1000.0 + 15 * 60)
    # A failed try waits an interval too; 0 turns copies off.
    assert not pitr.artifact_copy_due({"artifacts_tried": 1000.0}, 1000.0 + 60)
    monkeypatch.setenv("PITR_ARTIFACT_COPY_MINUTES", "0")
    assert not pitr.artifact_copy_due({}, 1000.0)


SEG = "000000010000000000000007"


def test_wal_is_given_up_only_when_long_waiting_on_a_nearly_full_volume():
    assert pitr.must_give_up(SEG, 0.05, 10, waited=600, archive_seconds=60)
    assert not pitr.must_give_up(SEG, 0.15, 10, waited=600, archive_seconds=60)   # room left
    assert not pitr.must_give_up(SEG, 0.05, 10, waited=300, archive_seconds=60)   # a blip, not an outage
    assert not pitr.must_give_up(SEG, 0.0, 0, waited=10 ** 6, archive_seconds=60)   # 0: never
    # Below half the free space set: at once (a burst of writes may fill the rest in minutes).
    assert pitr.must_give_up(SEG, 0.04, 10, waited=1, archive_seconds=60)
    # A timeline's history (restores need it): never. A backup label or a promotion's partial
    # segment (recovery never asks for them): as a segment, or one stuck would block the rest.
    assert not pitr.must_give_up("00000002.history", 0.0, 10, waited=10 ** 6, archive_seconds=60)
    assert pitr.must_give_up(SEG + ".00000028.backup", 0.01, 10, waited=10 ** 6, archive_seconds=60)
    assert pitr.must_give_up(SEG + ".partial", 0.01, 10, waited=10 ** 6, archive_seconds=60)


def test_archive_answers_retry_unless_it_gives_a_segment_up(tmp_path, monkeypatch):
    (tmp_path / "pg_wal").mkdir()
    segment = tmp_path / "pg_wal" / SEG
    segment.write_bytes(b"wal")
    os.utime(segment, (0, 0))  # closed long ago
    monkeypatch.setattr(pitr, "PGDATA", tmp_path)
    monkeypatch.setenv("PITR_ARCHIVE_SECONDS", "60")
    monkeypatch.setenv("PITR_WAL_MIN_FREE_PERCENT", "10")
    monkeypatch.setattr(pitr, "free_fraction", lambda _p: 0.5)
    assert pitr.give_up_or_retry(str(segment), "down") == 1 and pitr.read_given_up(tmp_path) == {}
    monkeypatch.setattr(pitr, "free_fraction", lambda _p: 0.01)
    assert pitr.give_up_or_retry(str(segment), "down") == 0
    assert pitr.read_given_up(tmp_path)["incidents"][0]["first"] == SEG
    monkeypatch.setenv("PITR_WAL_MIN_FREE_PERCENT", "0")
    assert pitr.give_up_or_retry(str(segment), "down") == 1


def test_given_up_wal_is_recorded_per_incident_and_a_base_backup_is_due_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PITR_BASE_BACKUP_HOURS", "24")
    (tmp_path / "pg_wal" / "archive_status").mkdir(parents=True)
    pitr.record_given_up(tmp_path, "000000010000000000000007", 1000.0, 1100.0, 60)
    record = pitr.record_given_up(tmp_path, "000000010000000000000008", 1050.0, 1200.0, 60)
    assert record == pitr.read_given_up(tmp_path) == {"incidents": [
        {"first": "000000010000000000000007", "first_closed": 1000.0, "last": "000000010000000000000008",
         "last_at": 1200.0, "count": 2}]}
    backup = {"id": "b", "begin": "1970-01-01T00:15:00+00:00", "end": "1970-01-01T00:15:05+00:00", "timeline": 1}
    assert "given up" in pitr.backup_due([backup], 1, at("1970-01-01 00:30:00"), record)
    later = dict(backup, begin="1970-01-01T00:25:00+00:00", end="1970-01-01T00:25:05+00:00")
    assert pitr.backup_due([later], 1, at("1970-01-01 00:30:00"), record) == ""
    metrics = pitr.metrics_text({"ok": True, "newest": "1970-01-01T00:25:05+00:00",
                                 "newest_begin": "1970-01-01T00:25:00+00:00"}, tmp_path, 1300.0)
    # PitrWalGivenUp compares the last given up with the newest base backup's beginning.
    assert "mlflow_stack_pitr_newest_base_backup_begin_timestamp_seconds 1500.0" in metrics
    assert "mlflow_stack_pitr_wal_segments_given_up 2" in metrics
    assert "mlflow_stack_pitr_wal_last_given_up_timestamp_seconds 1200.0" in metrics
    # Long after: another incident, which a restore between the two must tell apart.
    again = pitr.record_given_up(tmp_path, "000000010000000000000030", 90000.0, 90100.0, 60)
    assert len(again["incidents"]) == 2 and again["incidents"][1]["count"] == 1


def test_a_restore_that_would_need_given_up_wal_is_refused(monkeypatch):
    monkeypatch.setenv("PITR_ARCHIVE_SECONDS", "60")
    day1 = {"count": 3, "first": "x", "first_closed": at("2026-12-01 17:00:00").timestamp(),
            "last": "y", "last_at": at("2026-12-01 17:30:00").timestamp()}
    day3 = {"count": 1, "first": "z", "first_closed": at("2026-12-03 09:00:00").timestamp(),
            "last": "z", "last_at": at("2026-12-03 09:20:00").timestamp()}
    gaps = {"incidents": [day1, day3]}
    before = {"id": "a", "begin": "2026-12-01T12:00:00+00:00", "end": "2026-12-01T12:00:05+00:00"}
    healed = {"id": "b", "begin": "2026-12-01T18:00:00+00:00", "end": "2026-12-01T18:00:05+00:00"}
    assert pitr.across_given_up(before, at("2026-12-01 16:58:00"), gaps) == ""
    assert "lacks WAL from about 2026-12-01 16:59:00" in pitr.across_given_up(before, at("2026-12-01 17:10:00"), gaps)
    # From the base backup that healed day 1: day 2 is fine, day 3's gap is not.
    assert pitr.across_given_up(healed, at("2026-12-02 12:00:00"), gaps) == ""
    assert "2026-12-03 08:59:00" in pitr.across_given_up(healed, at("2026-12-03 10:00:00"), gaps)
    assert pitr.across_given_up(before, at("2026-12-01 17:10:00"), {}) == ""

def test_the_archive_is_listed_when_a_base_backup_may_be_due(tmp_path, monkeypatch):
    monkeypatch.setenv("PITR_BASE_BACKUP_HOURS", "24")
    monkeypatch.setattr(pitr, "PGDATA", tmp_path)
    now = at("2026-12-07 12:00:00").timestamp()
    state = {"ok": True, "newest": "2026-12-07T10:00:05+00:00", "newest_begin": "2026-12-07T10:00:00+00:00",
             "newest_timeline": 1}
    assert not pitr.may_be_due(state, 1, now)
    assert pitr.may_be_due(state, 2, now)                                    # a restore's new timeline
    assert pitr.may_be_due({**state, "ok": False}, 1, now)                   # a failed look
    assert pitr.may_be_due({"ok": True}, 1, now)                             # none yet
    assert pitr.may_be_due(state, 1, now + 23 * 3600)                        # the interval over
    (tmp_path / "pg_wal").mkdir()
    pitr.record_given_up(tmp_path, SEG, now - 100, now - 50, 60)
    assert pitr.may_be_due(state, 1, now)                                    # WAL given up since
