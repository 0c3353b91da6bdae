"""Point-in-time recovery end to end: the database restored to a moment from its archive.

On a stack of its own: the restore replaces its database. A client logs metric points
one by one (each with the time it was sent and the time its 200 came back); the test
notes a moment T in the middle, the client logs on, then `db/db_volume_restore.sh
--to-time T` puts the database back: every point acknowledged before T is there, none
sent after T is, asserted on PostgreSQL's rows. Before that, the archive failing (the
store down; a segment of another history in its place) is reported and caught up. The user store (its own database in the
same server) goes back to T too; the bucket keeps its objects; the server takes writes
again and the archive goes on, on the database's new timeline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
import uuid

import pytest

from .conftest import new_stack, show, stack_lifetime, wait_for

pytestmark = pytest.mark.slow

ARCHIVE_SECONDS = 10


@pytest.fixture(scope="module")
def stack(standins, tmp_path_factory):
    own = new_stack(standins, tmp_path_factory.mktemp("pitr-stack"), "mlflowpitr")
    own.environ["PITR_ARCHIVE_SECONDS"] = str(ARCHIVE_SECONDS)
    with stack_lifetime(own) as deployed:
        yield deployed


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def pitr(stack, *args: str) -> str:
    return stack.compose("run", "--rm", "--no-deps", "-T", "pitr", *args).stdout


def make_run(stack) -> str:
    exp = stack.http("POST", "/api/2.0/mlflow/experiments/create", json={"name": f"pitr-{uuid.uuid4().hex[:6]}"})
    assert exp.status_code == 200, exp.text
    run = stack.http("POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": exp.json()["experiment_id"]})
    assert run.status_code == 200, run.text
    return run.json()["run"]["info"]["run_id"]


def steps_in_db(stack, run_id: str) -> set[int]:
    out = stack.psql(f"SELECT step FROM metrics WHERE run_uuid = '{run_id}' AND key = 'pitr'")
    return {int(line) for line in out.split()}


def test_a_write_reaches_the_archive_within_the_archive_timeout(stack):
    """The most acknowledged writes a lost disk can cost: measured, not assumed."""
    run_id = make_run(stack)
    assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
        "run_id": run_id, "key": "rpo", "value": 1, "timestamp": 0, "step": 0}).status_code == 200
    written = time.monotonic()
    segment = stack.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    archived = wait_for(lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment,
                        ARCHIVE_SECONDS + 120, f"WAL segment {segment} to be archived")
    assert archived
    lag = time.monotonic() - written
    show(f"point-in-time archive: a write's WAL segment was in the archive {lag:.1f} s after the write "
         f"(archive_timeout {ARCHIVE_SECONDS} s; the default PITR_ARCHIVE_SECONDS is 60)")
    status = json.loads(pitr(stack, "status"))
    assert status["archive_mode"] == "on" and status["backups"], status
    assert status["backups"][-1]["timeline"] == 1


def metrics(stack) -> dict[str, float]:
    text = stack.compose("exec", "-T", "pitr", "python3", "-c", "import os, urllib.request; print(urllib.request."
                         "urlopen(f'http://localhost:{os.environ[\"PITR_METRICS_PORT\"]}/metrics', timeout=10)"
                         ".read().decode())").stdout
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and line[0] != "#")}


def test_an_archive_that_fails_is_reported_and_catches_up_when_back(stack):
    """The object store down: closed WAL segments wait on the database's volume, the
    metric behind PitrArchiveLagging counts them and ages the oldest, the service turns
    unhealthy; back up, the archive takes them all and nothing was lost."""
    run_id = make_run(stack)
    # A segment the archive timeout just closed may be on its way.
    wait_for(lambda: not metrics(stack)["mlflow_stack_pitr_wal_segments_waiting"], 180, "no segment waiting")
    stack.compose("stop", "minio")
    try:
        assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
            "run_id": run_id, "key": "pitr", "value": 1, "timestamp": 0, "step": 1}).status_code == 200
        segment = stack.psql("SELECT pg_walfile_name(pg_switch_wal())")
        waiting = wait_for(lambda: (m := metrics(stack))["mlflow_stack_pitr_wal_segments_waiting"] >= 1
                           and m["mlflow_stack_pitr_oldest_waiting_segment_age_seconds"] > 0 and m,
                           60, "the metric to count the segment the archive did not take")
        assert waiting["mlflow_stack_pitr_newest_base_backup_timestamp_seconds"] > 0, waiting
        failing = wait_for(lambda: "fails" in (out := stack.compose("exec", "-T", "pitr", "python3",
                                                                     "/usr/local/bin/mlflow-stack-pitr", "health",
                                                                     check=False).stdout) and out,
                           60, "the pitr service's health to say archiving fails")
        assert segment in failing, failing
    finally:
        stack.compose("start", "minio")
    # PostgreSQL tries a failed segment again at the latest a minute later.
    wait_for(lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment
             and not metrics(stack)["mlflow_stack_pitr_wal_segments_waiting"],
             180, f"the archive to take {segment} and every segment after it once the store is back")
    assert steps_in_db(stack, run_id) == {1}
    assert "restores back to" in stack.script("show_all.sh").stdout


def put_or_delete_in_archive(stack, key: str, body: bytes | None) -> None:
    """As another database would: the object at `key` in the archive's bucket (None: delete it)."""
    code = ("import gzip, os, sys\n"
            "from stack import common\n"
            "s3 = common.s3_client()\n"
            "body = sys.stdin.buffer.read()\n"
            f"key = {key!r}\n"
            "if body: s3.put_object(Bucket=os.environ['PITR_BUCKET'], Key=key, Body=gzip.compress(body))\n"
            "else: s3.delete_object(Bucket=os.environ['PITR_BUCKET'], Key=key)\n")
    stack.compose("exec", "-T", "pitr", "python3", "-c", code, stdin=(body or b"").decode())


def test_a_segment_of_another_history_is_never_overwritten(stack):
    """The archive already holds the next segment with other content (another database's,
    or this one's before its volume was replaced): archiving stops and says why, the
    archive's copy stays as it was; once it is gone, archiving goes on."""
    run_id = make_run(stack)
    # The segment after the one being written: nothing of it is written, let alone archived,
    # before the next switch (the archive timeout switches at most every 10 s).
    current = stack.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    segment = next_segment(current)
    key = f"stack/wals/{segment[:16]}/{segment}.gz"
    put_or_delete_in_archive(stack, key, b"another history")
    try:
        assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
            "run_id": run_id, "key": "pitr", "value": 1, "timestamp": 0, "step": 2}).status_code == 200

        def closed() -> bool:  # a commit, and the segment it is in closed, until `segment` is
            stack.psql("SELECT txid_current()")
            return stack.psql("SELECT pg_walfile_name(pg_switch_wal())") >= segment

        wait_for(closed, 180, f"{segment} to be closed", interval=1)
        said = f"already holds a different {segment}"
        wait_for(lambda: said in stack.compose("logs", "db").stdout,
                 180, "the db's log to say the archive holds another history")
        assert metrics(stack)["mlflow_stack_pitr_wal_segments_waiting"] >= 1
        assert (stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") or "") < segment
    finally:
        put_or_delete_in_archive(stack, key, None)
    wait_for(lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment, 180,
             f"{segment} to be archived once the other history's copy is gone")
    assert steps_in_db(stack, run_id) == {2}


def next_segment(name: str) -> str:
    """The WAL segment after `name` (16 MiB segments: 256 to a log)."""
    timeline, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    log, seg = (log + 1, 0) if seg == 0xFF else (log, seg + 1)
    return f"{timeline:08X}{log:08X}{seg:08X}"


@pytest.mark.parametrize("when, says", [
    ("yesterday at five", "is not a time"),
    ("2099-01-01 00:00:00", "is in the future"),
    ("2001-01-01 00:00:00+02:00", "the archive reaches back to"),
])
def test_a_time_it_cannot_restore_to_is_refused_and_changes_nothing(stack, when, says):
    ids = stack.container_ids()
    refused = stack.script("db/db_volume_restore.sh", "--to-time", when, "--yes", check=False)
    assert refused.returncode != 0 and says in refused.stderr and "nothing was changed" in refused.stderr, \
        refused.stderr[-2000:]
    assert stack.container_ids() == ids


POINTS_EACH_SIDE = 15


def points_around_a_moment(stack, run_id: str, after_moment=None, span_after: float = 0.0) -> tuple[list, dt.datetime]:
    """A client logs metric points one by one (key "pitr", step n) until POINTS_EACH_SIDE were
    acknowledged more than 1.5 s ago, the moment T is noted, it logs until POINTS_EACH_SIDE more
    were sent after T and one after T + span_after (after_moment() is called then, and must
    answer 200); the points as (step, sent, acknowledged) and T. Counts, not times: a slow
    machine logs as many, a fast one as long."""
    points: list[tuple[int, dt.datetime, dt.datetime]] = []
    stop = threading.Event()
    failures: list[str] = []

    def log_points() -> None:
        step = 0
        while not stop.is_set():
            sent = utc_now()
            try:
                answer = stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
                    "run_id": run_id, "key": "pitr", "value": step, "timestamp": 0, "step": step})
            except Exception as exc:  # noqa: BLE001 - said by the test, not lost with the thread
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if answer.status_code != 200:
                failures.append(answer.text[:200])
                return
            points.append((step, sent, utc_now()))
            step += 1

    def logged(condition) -> bool:
        return bool(failures) or len([p for p in list(points) if condition(p)]) >= POINTS_EACH_SIDE

    logger = threading.Thread(target=log_points)
    logger.start()
    try:
        wait_for(lambda: logged(lambda p: p[2] < utc_now() - dt.timedelta(seconds=1.5)), 300,
                 f"{POINTS_EACH_SIDE} points acknowledged before the moment", interval=0.1)
        target = utc_now()
        later = target + dt.timedelta(seconds=span_after)
        wait_for(lambda: logged(lambda p: p[1] > target) and (failures or any(p[1] > later for p in list(points))),
                 300, f"{POINTS_EACH_SIDE} points sent after the moment, one {span_after:g} s after it", interval=0.1)
        if after_moment is not None:
            answer = after_moment()
            assert answer.status_code == 200, answer.text[:300]
            time.sleep(1)
    finally:
        stop.set()
        logger.join(timeout=120)
    assert not failures, failures
    return points, target


def test_restore_to_a_moment_keeps_what_was_acknowledged_before_it_and_nothing_sent_after(stack):
    run_id = make_run(stack)
    # An artifact logged before T, read back after the restore.
    blob = uuid.uuid4().bytes * 4096
    path = f"/api/2.0/mlflow-artifacts/artifacts/pitr/{run_id}/blob.bin"
    assert stack.http("PUT", path, data=blob).status_code == 200
    before_user, after_user = f"pitr-before-{uuid.uuid4().hex[:6]}", f"pitr-after-{uuid.uuid4().hex[:6]}"
    assert stack.http("POST", "/api/2.0/mlflow/users/create",
                      json={"username": before_user, "password": uuid.uuid4().hex}).status_code == 200

    # One sent after the second restore's moment (T + 2 s), below.
    points, target = points_around_a_moment(stack, run_id, span_after=3, after_moment=lambda: stack.http(
        "POST", "/api/2.0/mlflow/users/create", json={"username": after_user, "password": uuid.uuid4().hex}))
    before = [p for p in points if p[2] < target - dt.timedelta(seconds=1)]
    after = [p for p in points if p[1] > target]
    assert len(before) > 10 and len(after) > 10, (len(before), len(after))
    assert steps_in_db(stack, run_id) == {p[0] for p in points}

    # An offset, as a user east of UTC writes it.
    written = target.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat(sep=" ")
    started = time.monotonic()
    restored = stack.script("db/db_volume_restore.sh", "--to-time", written, "--yes")
    took = time.monotonic() - started
    assert "Restored the database to" in restored.stderr, restored.stderr[-2000:]

    steps = steps_in_db(stack, run_id)
    assert {p[0] for p in before} <= steps, sorted({p[0] for p in before} - steps)[:20]
    assert not steps & {p[0] for p in after}, sorted(steps & {p[0] for p in after})[:20]
    users = stack.psql("SELECT username FROM users", "_auth").split()
    assert before_user in users and after_user not in users, users
    show(f"point-in-time restore: {len(steps)} of {len(points)} points kept ({len(before)} acknowledged more than "
         f"1 s before the moment, {len(after)} sent after it), the whole restore (safety set, archive flush, base "
         f"backup fetch, replay, servers back) in {took:.0f} s")

    # The bucket kept its objects; the stack serves, and the archive goes on on a new timeline.
    read = stack.http("GET", path)
    assert read.status_code == 200 and hashlib.sha256(read.content).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
        "run_id": run_id, "key": "pitr", "value": -1, "timestamp": 0, "step": 10 ** 6}).status_code == 200
    assert stack.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")[:8] == "00000002"
    wait_for(lambda: any(b["timeline"] == 2 for b in json.loads(pitr(stack, "status"))["backups"]), 300,
             "a base backup on the restored database's timeline")
    safety = sorted((stack.workdir / "backups").glob("mlflow-backup-*-pre-restore"))
    assert safety, "no safety set was taken"

    # Again, to a moment the first restore went back before: it is on the history that
    # restore left (timeline 1), not on the newest one, and a third timeline goes on from it.
    second = target + dt.timedelta(seconds=2)
    kept = {p[0] for p in points if p[2] < second - dt.timedelta(seconds=1)}
    dropped = {p[0] for p in points if p[1] > second} | {10 ** 6}
    assert kept - {p[0] for p in before} and dropped - {10 ** 6}, (len(kept), len(dropped))
    again = stack.script("db/db_volume_restore.sh", "--to-time", second.isoformat(sep=" "), "--yes")
    assert "Restored the database to" in again.stderr, again.stderr[-2000:]
    steps = steps_in_db(stack, run_id)
    assert kept <= steps and not steps & dropped, (sorted(kept - steps)[:20], sorted(steps & dropped)[:20])
    assert stack.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")[:8] == "00000003"
