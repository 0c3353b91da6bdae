#!/usr/bin/env python3
"""Point-in-time recovery of the stack's PostgreSQL, with barman-cloud (runs in the db image).

PostgreSQL archives every WAL segment to the archive (PITR_BUCKET on the stack's object
store) when it fills, or after PITR_ARCHIVE_SECONDS with writes in it (archive_timeout):
at most that much of acknowledged writes is lost with the disk. A base backup every
PITR_BASE_BACKUP_HOURS is where a restore starts; the WAL after it replays the database
to any moment since. Both are kept PITR_RETENTION_DAYS (a recovery window).

  archive PATH        archive_command: one WAL segment to the archive
  fetch NAME DEST [BUCKET]
                      restore_command: one WAL segment from the archive (or BUCKET's)
  schedule            the pitr service: a base backup when the newest is too old (or of an
                      earlier timeline, after a restore), old ones deleted; loops
  base-backup         one base backup now
  health              exit 0 while the newest base backup is recent and archiving works
  status              the archive's state as JSON (backups, last archived segment, lag)
  summary             one line for ./show_all.sh: the window a restore may go to, the lag
  flush               close the current WAL segment and wait until it is archived
  plan TIME           check TIME and print, as JSON, the base backup a restore to it starts from
  restore TIME ID TL  (db stopped, its volume mounted) the data folder becomes base backup ID,
                      set to replay the archive along timeline TL up to TIME
  wait-recovered      wait until the restored database has replayed to its target and
                      takes writes, then drop the recovery settings
  artifacts-copy      (archive off the machine) copy the artifact bucket there now, encrypted
  artifacts-restore   copy the artifacts from the archive's store back into the bucket

TIME is UTC ("2026-12-06 16:59:30") or has an offset ("2026-12-06 17:59:30+01:00").
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stack import common, settings

PGDATA = Path(os.environ.get("PGDATA", "/var/lib/postgresql/data"))
# The server's name in the archive (a folder of PITR_BUCKET). Fixed: a stack restored on a
# new machine, under another project name, finds its archive by the bucket alone.
SERVER_NAME = "stack"
STATE = Path("/tmp/pitr-state.json")
RECOVERY_MARK = "# mlflow-stack: point-in-time restore (removed when recovery ends)"


class PitrError(Exception):
    """The archive cannot be used as asked; the message says why and what to do."""


def log(message: str) -> None:
    print(f"pitr: {message}", file=sys.stderr, flush=True)


def value(key: str) -> str:
    return settings.value(key, os.environ)


def archive_url(bucket: str = "") -> str:
    return f"s3://{bucket or value('PITR_BUCKET')}"


def cloud_env() -> dict[str, str]:
    """barman-cloud's environment: the store's keys from the secret files (never argv, never
    the container's environment), and botocore's checksums only when required (S3-compatible
    stores reject its newer defaults)."""
    return {**os.environ,
            "AWS_ACCESS_KEY_ID": common.secret("AWS_ACCESS_KEY_ID"),
            "AWS_SECRET_ACCESS_KEY": common.secret("AWS_SECRET_ACCESS_KEY"),
            "AWS_DEFAULT_REGION": common.env("S3_REGION", "us-east-1"),
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def cloud_args() -> list[str]:
    return ["--cloud-provider", "aws-s3", "--endpoint-url", common.env("S3_INTERNAL_ENDPOINT", common.OWN_S3_ENDPOINT)]


def barman(tool: str, *args: str, capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    argv = [f"barman-cloud-{tool}", *cloud_args(), *args]
    return subprocess.run(argv, env=cloud_env(), capture_output=capture, text=True, timeout=timeout, check=False)


def pg_env() -> dict[str, str]:
    p = common.postgres_params()
    return {**os.environ, "PGHOST": p["host"], "PGPORT": p["port"], "PGUSER": p["user"],
            "PGPASSWORD": p["password"], "PGDATABASE": p["dbname"], "PGCONNECT_TIMEOUT": "10"}


def query(sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(**{**common.postgres_params(), "dbname": "postgres", "connect_timeout": 10})
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


# --- Time -------------------------------------------------------------------

def parse_time(text: str) -> dt.datetime:
    """A moment as the user wrote it: UTC unless it carries an offset."""
    cleaned = text.strip().replace("T", " ")
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(cleaned)
    except ValueError:
        raise PitrError(f"{text!r} is not a time: write it as \"2026-12-06 16:59:30\" (UTC) or with an offset, "
                        "\"2026-12-06 17:59:30+01:00\"") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc)


def pg_time(moment: dt.datetime) -> str:
    """As recovery_target_time reads it (an explicit UTC offset: no server time zone applies)."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def barman_time(text: str) -> dt.datetime:
    """A time barman-cloud wrote (e.g. "Mon Dec  7 07:15:02 2026", or ISO)."""
    text = text.strip()
    for fmt in ("%a %b %d %H:%M:%S %Y", "%Y-%m-%d %H:%M:%S.%f%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z",
                "%Y-%m-%dT%H:%M:%S%z"):
        try:
            moment = dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    return parse_time(text)


# --- The archive --------------------------------------------------------------

def backups() -> list[dict]:
    """The archive's finished base backups, oldest first: id, begin, end (UTC), timeline."""
    done = barman("backup-list", "--format", "json", archive_url(), SERVER_NAME, capture=True, timeout=300)
    if done.returncode != 0:
        raise PitrError(f"the archive s3://{value('PITR_BUCKET')} cannot be listed: "
                        f"{(done.stderr or done.stdout).strip()[-400:]}")
    found = []
    for item in json.loads(done.stdout or "{}").get("backups_list", []):
        if item.get("status") != "DONE":
            continue
        # The _iso times carry their offset; the others are the server's local ctime.
        found.append({"id": item["backup_id"],
                      "begin": barman_time(item.get("begin_time_iso") or item["begin_time"]).isoformat(),
                      "end": barman_time(item.get("end_time_iso") or item["end_time"]).isoformat(),
                      "timeline": int(item.get("timeline", 1)), "end_lsn": item.get("end_xlog"),
                      "systemid": str(item.get("systemid") or "")})
    return sorted(found, key=lambda b: b["end"])


def of_one_database(found: list[dict], system_id: str = "") -> list[dict]:
    """The base backups of one database (PostgreSQL's system identifier): system_id's, or the
    newest's (an archive restored from after a lost machine). A new machine's stack leaves a
    backup of the empty database it was deployed with first: never a place to start a
    restore of the other (unit-tested)."""
    if not found:
        return []
    wanted = system_id or found[-1]["systemid"]
    return [b for b in found if b["systemid"] == wanted]


def current_system_id() -> str:
    return str(query("SELECT system_identifier FROM pg_control_system()")[0][0])


def foreign_archive(found: list[dict], system_id: str, timeline: int) -> str:
    """Why this database must not write backups into the archive, or "" (unit-tested): a new,
    empty database (timeline 1) over an archive whose backups are all another database's,
    the lost machine's, say. Its base backups would hide that history from restores and its
    retention would delete it."""
    if timeline != 1 or not found or any(b["systemid"] == system_id for b in found):
        return ""
    return (f"the archive s3://{value('PITR_BUCKET')} holds another database's backups (system id "
            f"{found[-1]['systemid']}; this one is {system_id}), a lost machine's perhaps: nothing is written "
            "there. To restore from it: set PITR_BUCKET to a new bucket, deploy, then db/db_volume_restore.sh "
            f"--to-time TIME --from-archive {value('PITR_BUCKET')} (docs/backups.md, 'A lost machine'); to start "
            "afresh, empty that bucket")


def archiver() -> dict:
    row = query("SELECT last_archived_wal, last_archived_time, last_failed_wal, last_failed_time, failed_count, "
                "pg_walfile_name(pg_current_wal_lsn()), now(), "
                "(SELECT setting FROM pg_settings WHERE name = 'archive_mode') FROM pg_stat_archiver")[0]
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {"last_archived_wal": row[0], "last_archived_time": iso(row[1]), "last_failed_wal": row[2],
            "last_failed_time": iso(row[3]), "failed_count": row[4], "current_wal": row[5], "now": iso(row[6]),
            "archive_mode": row[7]}


def current_timeline() -> int:
    """The timeline WAL is written on now (a WAL file name starts with it): right after a
    restore's promotion, before any checkpoint names it."""
    return int(query("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0][:8], 16)


SEGMENT = re.compile(r"[0-9A-F]{24}")
# What archive_command may give up: segments, a promotion's .partial one and backup labels, which
# recovery never asks for; never a timeline's .history, which restores need (while one is stuck,
# nothing after it is given up either: PostgreSQL archives in order).
GIVE_UP_NAMES = re.compile(r"[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?")


def archived_copy(client, name: str) -> bytes | None:
    """The archive's copy of WAL segment `name` (uncompressed), or None if it has none."""
    bucket = value("PITR_BUCKET")
    key = f"{SERVER_NAME}/wals/{name[:16]}/{name}"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
    for found in (o["Key"] for o in listed if o["Key"] in (key, key + ".gz")):
        body = client.get_object(Bucket=bucket, Key=found)["Body"].read()
        return gzip.decompress(body) if found.endswith(".gz") else body
    return None


def overwrite_refusal(name: str, local: bytes, archived: bytes | None) -> str:
    """Why segment `name` must not go to the archive, "" if it may (unit-tested). The archive
    never overwrites a segment with other content (PostgreSQL's own rule for an
    archive_command): another history of this database, whose volume was replaced or
    copied, would silently destroy the one a restore needs."""
    if archived is None or archived == local:
        return ""
    return (f"the archive s3://{value('PITR_BUCKET')} already holds a different {name}: it is the history of "
            "another database (was the db volume replaced, or does another stack archive to this bucket?). "
            "Nothing was overwritten; PostgreSQL keeps the segment and retries. See \"An archive that "
            "belongs to another database\" in docs/backups.md")


# WAL given up when the archive fails and the database's volume is nearly full: a record in
# pg_wal (whose content base backups leave out, so a restore does not bring an old one back;
# the pitr service reads it through its read-only mount). PostgreSQL only touches files there
# that are named like WAL.
GIVEN_UP = Path("pg_wal") / "mlflow-stack-wal-given-up.json"
# A segment is given up only after it has waited this many archive timeouts: a short failure
# (a restart of the store, a network blip) never costs the archive anything.
GIVE_UP_AFTER_TIMEOUTS = 10


def free_fraction(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail / st.f_blocks if st.f_blocks else 1.0


def must_give_up(name: str, free: float, min_free_percent: int, waited: float, archive_seconds: float) -> bool:
    """Give a WAL segment up (the archive fails) rather than let the volume fill: PostgreSQL
    stops when it cannot write WAL, and every user's writes with it. Never a timeline's history
    (restores need it), only below the free space set, and only after it has waited
    GIVE_UP_AFTER_TIMEOUTS archive timeouts, or at once below half of it (unit-tested)."""
    if not GIVE_UP_NAMES.fullmatch(name) or min_free_percent <= 0 or free * 100 >= min_free_percent:
        return False
    # Below half the free space set, at once: a burst of writes may fill the rest in minutes.
    return waited >= GIVE_UP_AFTER_TIMEOUTS * archive_seconds or free * 200 < min_free_percent


def read_given_up(pgdata: Path) -> dict:
    """{"incidents": [{first, first_closed, last, last_at, count}, ...]}: WAL given up, oldest first."""
    try:
        record = json.loads((pgdata / GIVEN_UP).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record.get("incidents"), list) else {}


def record_given_up(pgdata: Path, name: str, closed: float, now: float, archive_seconds: float) -> dict:
    """One more segment given up: part of the last incident if that one went on until
    recently, else a new incident (a restore may start between two)."""
    incidents = read_given_up(pgdata).get("incidents", [])
    if incidents and now - incidents[-1]["last_at"] <= 2 * GIVE_UP_AFTER_TIMEOUTS * archive_seconds:
        incidents[-1] = {**incidents[-1], "last": name, "last_at": now, "count": incidents[-1]["count"] + 1}
    else:
        incidents.append({"first": name, "first_closed": closed, "last": name, "last_at": now, "count": 1})
    record = {"incidents": incidents}
    path = pgdata / GIVEN_UP
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(json.dumps(record))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    # The rename too survives a crash (PostgreSQL syncs its own .done marks).
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return record


def give_up_or_retry(path: str, why: str) -> int:
    """archive_command's answer when the archive did not take a file: 1 (PostgreSQL keeps it
    and retries), or, for a segment that waited long on a nearly full volume, 0 after
    recording it as given up."""
    minimum, archive_seconds = int(value("PITR_WAL_MIN_FREE_PERCENT")), float(value("PITR_ARCHIVE_SECONDS"))
    name, closed = Path(path).name, Path(path).stat().st_mtime
    free = free_fraction(PGDATA)
    if not must_give_up(name, free, minimum, time.time() - closed, archive_seconds):
        return 1
    record = record_given_up(PGDATA, name, closed, time.time(), archive_seconds)["incidents"][-1]
    log(f"GIVING UP WAL segment {name} ({why}): the database's volume has {free * 100:.1f}% free, under "
        f"PITR_WAL_MIN_FREE_PERCENT={minimum}, and the database would stop when it is full. Its writes are safe in "
        "the database, but the archive lacks them: restores to moments after about "
        f"{dt.datetime.fromtimestamp(record['first_closed'], dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC are possible "
        "again once the next base backup is taken (pitr takes one as soon as the archive works)")
    return 0


def cmd_archive(args: list[str]) -> int:
    (path,) = args
    name = Path(path).name
    if SEGMENT.fullmatch(name):
        try:
            local = Path(path).read_bytes()
            archived = archived_copy(common.s3_client(attempts=2), name)
        except Exception as exc:  # noqa: BLE001 - the store down: PostgreSQL retries later
            log(f"archiving {name}: the archive cannot be read ({type(exc).__name__}: {str(exc)[:300]}); "
                "PostgreSQL keeps the segment and retries")
            return give_up_or_retry(path, "the archive cannot be read")
        if archived is not None:
            why = overwrite_refusal(name, local, archived)
            if why:
                log(why)
                return give_up_or_retry(path, "the archive holds another history")
            return 0  # already there, the same: an earlier attempt that PostgreSQL did not hear end
    done = barman("wal-archive", "--gzip", archive_url(), SERVER_NAME, path, capture=True, timeout=600)
    if done.returncode != 0:
        # PostgreSQL keeps the segment and tries again; its log gets why.
        log(f"archiving {name} to {archive_url()} failed (PostgreSQL keeps it and retries): "
            f"{(done.stderr or done.stdout).strip()[-500:]}")
        return give_up_or_retry(path, "the archive did not take it")
    return 0


def cmd_fetch(args: list[str]) -> int:
    # BUCKET: the archive a restore reads (another than PITR_BUCKET after a lost machine).
    name, dest, *bucket = args
    # Exit 1 for a segment the archive does not have: recovery ends there (PostgreSQL asks
    # past the end by design), so no message for that.
    return barman("wal-restore", archive_url(*bucket), SERVER_NAME, name, dest, capture=True, timeout=600).returncode


def base_backup() -> None:
    p = common.postgres_params()
    log("taking a base backup")
    started = time.monotonic()
    done = subprocess.run(["barman-cloud-backup", *cloud_args(), "--gzip", "--immediate-checkpoint",
                           "-h", p["host"], "-p", p["port"], "-U", p["user"], "-d", "postgres",
                           archive_url(), SERVER_NAME],
                          env={**cloud_env(), "PGPASSWORD": p["password"], "PGCONNECT_TIMEOUT": "10"},
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PitrError(f"the base backup failed: {(done.stderr or done.stdout).strip()[-800:]}")
    log(f"base backup done in {time.monotonic() - started:.1f} s")


def retention() -> None:
    policy = f"RECOVERY WINDOW OF {value('PITR_RETENTION_DAYS')} DAYS"
    done = barman("backup-delete", "--retention-policy", policy, archive_url(), SERVER_NAME, capture=True, timeout=3600)
    if done.returncode != 0:
        log(f"deleting what falls out of the recovery window failed: {(done.stderr or done.stdout).strip()[-400:]}")


def backup_due(found: list[dict], timeline: int, now: dt.datetime, given_up: dict | None = None) -> str:
    """Why a base backup is due now, or "" (unit-tested)."""
    if not found:
        return "there is none yet"
    newest = found[-1]
    if newest["timeline"] != timeline:
        return f"the newest is of timeline {newest['timeline']}, the database is on {timeline} (after a restore)"
    last = max((i["last_at"] for i in (given_up or {}).get("incidents", [])), default=0)
    if last > dt.datetime.fromisoformat(newest["begin"]).timestamp():
        return (f"WAL segments were given up (the last at "
                f"{dt.datetime.fromtimestamp(last, dt.timezone.utc):%H:%M:%S} UTC): a base backup "
                "makes the archive whole again")
    age = (now - dt.datetime.fromisoformat(newest["end"])).total_seconds()
    if age >= float(value("PITR_BASE_BACKUP_HOURS")) * 3600:
        return f"the newest is {age / 3600:.1f} hours old"
    return ""


STATE_LOCK = threading.Lock()


def write_state(**fields) -> None:
    """Merge fields into the state, which the schedule's threads and a `pitr artifacts-copy`
    run in the same container share: one writer at a time (a lock file), each through a
    temporary file of its own."""
    import fcntl
    import tempfile

    with STATE_LOCK, open(STATE.with_name(f".{STATE.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = {**read_state(), **fields, "at": time.time()}
        handle, tmp = tempfile.mkstemp(dir=STATE.parent, prefix=f".{STATE.name}.")
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(state))
        os.replace(tmp, STATE)


def read_state() -> dict:
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return {}


def waiting_segments(pgdata: Path, now: float) -> tuple[int, float]:
    """WAL segments PostgreSQL has closed but not yet archived (their .ready marks), and the
    age of the oldest: the archive lag, which only grows while archiving fails or falls
    behind (an idle database closes no segment). Unit-tested."""
    ready = [m.stat().st_mtime for m in (pgdata / "pg_wal" / "archive_status").glob("*.ready")]
    return len(ready), max(0.0, now - min(ready)) if ready else 0.0


def metrics_text(state: dict, pgdata: Path, now: float) -> str:
    """What Prometheus scrapes from the pitr service (alerts PitrArchiveLagging,
    PitrBaseBackupTooOld). Unit-tested."""
    count, lag = waiting_segments(pgdata, now)
    rows = [("pitr_wal_segments_waiting", "gauge", "WAL segments closed but not yet in the archive", count),
            ("pitr_oldest_waiting_segment_age_seconds", "gauge",
             "age of the oldest WAL segment not yet in the archive (0: none waits)", round(lag, 3)),
            ("pitr_archive_timeout_seconds", "gauge", "PITR_ARCHIVE_SECONDS", float(value("PITR_ARCHIVE_SECONDS"))),
            ("pitr_base_backup_interval_seconds", "gauge", "PITR_BASE_BACKUP_HOURS in seconds",
             float(value("PITR_BASE_BACKUP_HOURS")) * 3600),
            ("pitr_last_look_ok", "gauge", "1 if the last look at the archive succeeded", 1 if state.get("ok") else 0)]
    if state.get("newest"):
        rows.append(("pitr_newest_base_backup_timestamp_seconds", "gauge", "when the newest base backup ended",
                     dt.datetime.fromisoformat(state["newest"]).timestamp()))
    incidents = read_given_up(pgdata).get("incidents", [])
    if incidents:
        rows.append(("pitr_wal_segments_given_up", "gauge", "WAL segments given up (never archived) to keep the "
                     "database's volume from filling", sum(i["count"] for i in incidents)))
        rows.append(("pitr_wal_last_given_up_timestamp_seconds", "gauge", "when a WAL segment was last given up",
                     max(i["last_at"] for i in incidents)))
    if state.get("newest_begin"):
        rows.append(("pitr_newest_base_backup_begin_timestamp_seconds", "gauge", "when the newest base backup began",
                     dt.datetime.fromisoformat(state["newest_begin"]).timestamp()))
    if artifact_copy_due({}, 0):
        rows.append(("pitr_artifact_copy_failing", "gauge", "1 if the last copy of the artifacts off the machine failed",
                     1 if state.get("artifacts_error") else 0))
        rows.append(("pitr_artifact_copy_interval_seconds", "gauge", "PITR_ARTIFACT_COPY_MINUTES in seconds",
                     float(value("PITR_ARTIFACT_COPY_MINUTES")) * 60))
        if (state.get("artifacts") or {}).get("at"):
            rows.append(("pitr_artifacts_last_copy_timestamp_seconds", "gauge",
                         "when the artifacts were last copied off the machine", state["artifacts"]["at"]))
    lines = []
    for name, kind, text, number in rows:
        lines += [f"# HELP mlflow_stack_{name} {text}", f"# TYPE mlflow_stack_{name} {kind}",
                  f"mlflow_stack_{name} {number}"]
    return "\n".join(lines) + "\n"


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = metrics_text(read_state(), PGDATA, time.time()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):  # a scrape every 15 s is no news
        pass


def serve_metrics() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", int(common.env("PITR_METRICS_PORT"))), _Metrics)  # noqa: S104 - backend network only
    threading.Thread(target=server.serve_forever, daemon=True).start()


# --- The artifacts, off the machine with the archive -------------------------------------
#
# With the archive off the machine (PITR_S3_ENDPOINT_URL), the artifact bucket is copied there
# too, encrypted (rclone's crypt: names and content, under PITR_ARTIFACT_PASSPHRASE from .env),
# to PITR_BUCKET/artifacts/. rclone compares size and time: a copy sends only what is new or
# changed, and deletes nothing there (a restore to a time before a gc finds the files).

def off_site() -> bool:
    return os.environ.get("PITR_OFF_SITE") == "true"


def rclone_env(bucket: str = "") -> dict[str, str]:
    """rclone's remotes from the secret files, in its environment only (never argv, never the
    container's): stack (the artifacts), offsite (the archive's store), safe (crypt over it)."""
    def s3(name: str, endpoint: str, key: str, secret_key: str, region: str) -> dict[str, str]:
        prefix = f"RCLONE_CONFIG_{name}_"
        return {f"{prefix}{k}": v for k, v in (("TYPE", "s3"), ("PROVIDER", "Other"), ("ENDPOINT", endpoint),
                                                ("ACCESS_KEY_ID", key), ("SECRET_ACCESS_KEY", secret_key),
                                                ("REGION", region), ("FORCE_PATH_STYLE", "true"),
                                                ("NO_CHECK_BUCKET", "true"))}

    obscured = subprocess.run(["rclone", "obscure", "-"], input=common.secret("PITR_ARTIFACT_PASSPHRASE"),
                              capture_output=True, text=True, check=True, env={**os.environ, "RCLONE_CONFIG": "/dev/null"})
    return {**os.environ, "RCLONE_CONFIG": "/dev/null", "RCLONE_CACHE_DIR": "/tmp/rclone",
            **s3("STACK", common.env("ARTIFACT_S3_ENDPOINT"), common.secret("ARTIFACT_ACCESS_KEY"),
                 common.secret("ARTIFACT_SECRET_KEY"), common.env("ARTIFACT_S3_REGION", "us-east-1")),
            **s3("OFFSITE", common.env("S3_INTERNAL_ENDPOINT"), common.secret("AWS_ACCESS_KEY_ID"),
                 common.secret("AWS_SECRET_ACCESS_KEY"), common.env("S3_REGION", "us-east-1")),
            "RCLONE_CONFIG_SAFE_TYPE": "crypt", "RCLONE_CONFIG_SAFE_REMOTE": f"offsite:{bucket or value('PITR_BUCKET')}/artifacts",
            "RCLONE_CONFIG_SAFE_PASSWORD": obscured.stdout.strip()}


def rclone_copy(source: str, dest: str, bucket: str = "", extra: tuple[str, ...] = ()) -> dict:
    """rclone copy SOURCE DEST; its final figures (transfers, bytes, checks, elapsed)."""
    # An object is sent when it is missing there or newer here (an artifact written again in
    # place), told by the listings' times without a HEAD request per object and side (crypt keeps
    # no hash). Objects listed page by page (no --fast-list: a bucket of millions would be held in
    # memory). Only notices and the final figures are logged.
    done = subprocess.run(["rclone", "copy", source, dest, "--update", "--use-server-modtime", *extra,
                           "--use-json-log", "--stats", "100h", "--stats-log-level", "NOTICE", "--max-duration", "20h"],
                          env=rclone_env(bucket), capture_output=True, text=True, timeout=24 * 3600, check=False)
    stats = last_stats(done.stderr)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines()[-200:] if '"level":"error"' in line][-3:]
        raise PitrError(f"copying the artifacts ({source} -> {dest}) failed: {' '.join(errors)[-600:] or done.stderr[-600:]}")
    return stats


def last_stats(log_text: str) -> dict:
    """The figures of rclone's last JSON stats line (unit-tested)."""
    for line in reversed(log_text.splitlines()):
        start = line.find("{")
        if start >= 0 and '"stats"' in line:
            try:
                stats = json.loads(line[start:])["stats"]
            except (ValueError, KeyError):
                continue
            return {"transfers": int(stats.get("transfers", 0)), "bytes": int(stats.get("bytes", 0)),
                    "checks": int(stats.get("checks", 0)), "seconds": round(float(stats.get("elapsedTime", 0)), 3)}
    return {"transfers": 0, "bytes": 0, "checks": 0, "seconds": 0.0}


def copy_artifacts() -> dict:
    write_state(artifacts_tried=time.time())
    try:
        stats = rclone_copy(f"stack:{common.env('MLFLOW_BUCKET')}", "safe:")
    except Exception as exc:  # noqa: BLE001 - rclone's, the secrets' (said in the state and the log)
        said = str(exc) if isinstance(exc, (PitrError, common.ConfigError)) else f"{type(exc).__name__}: {exc}"
        write_state(artifacts_error=said[:500])
        raise
    log(f"artifacts copied off the machine: {stats['transfers']} new or changed objects, {stats['bytes']} bytes "
        f"({stats['checks']} unchanged) in {stats['seconds']:.1f} s")
    stats = {**stats, "at": time.time()}
    write_state(artifacts=stats, artifacts_error=None)
    return stats


def artifact_copy_due(state: dict, now: float) -> bool:
    """A copy is due when the last try (failed or not) is PITR_ARTIFACT_COPY_MINUTES old; 0: never."""
    minutes = float(value("PITR_ARTIFACT_COPY_MINUTES"))
    tried = state.get("artifacts_tried") or (state.get("artifacts") or {}).get("at")
    return off_site() and minutes > 0 and (not tried or now - tried >= minutes * 60)


# The longest the schedule goes without listing the archive (its health's "last look").
LIST_SECONDS = 300


def may_be_due(state: dict, timeline: int, now: float) -> bool:
    """Whether a base backup may be due, from the state of the last look (unit-tested): none
    yet, a failed look, a new timeline, WAL given up since the newest began, the interval over."""
    if not state.get("ok") or not state.get("newest") or state.get("newest_timeline") != timeline:
        return True
    began = dt.datetime.fromisoformat(state.get("newest_begin") or state["newest"]).timestamp()
    if any(i["last_at"] > began for i in read_given_up(PGDATA).get("incidents", [])):
        return True
    return now - dt.datetime.fromisoformat(state["newest"]).timestamp() >= float(value("PITR_BASE_BACKUP_HOURS")) * 3600


def artifact_loop() -> None:
    """The artifact copy, in a thread of its own: a long first copy holds up no base backup."""
    while True:
        if artifact_copy_due(read_state(), time.time()):
            try:
                copy_artifacts()
            except Exception as exc:  # noqa: BLE001 - recorded by copy_artifacts; tried again an interval later
                log(f"copying the artifacts off the machine failed: {exc}")
        time.sleep(60)


def cmd_artifacts_copy(_args: list[str]) -> int:
    if not off_site() or not float(value("PITR_ARTIFACT_COPY_MINUTES")):
        raise PitrError("the artifacts are not copied: the archive is on this machine (no PITR_S3_ENDPOINT_URL), or "
                        "PITR_ARTIFACT_COPY_MINUTES is 0")
    stats = copy_artifacts()
    print(json.dumps(stats))
    return 0


def cmd_artifacts_restore(_args: list[str]) -> int:
    """The artifacts copied off the machine (from PITR_BUCKET's archive) into MLFLOW_BUCKET:
    what is missing or differs there; nothing is deleted."""
    # What the bucket holds already (written since the restore) is left as it is.
    stats = rclone_copy("safe:", f"stack:{common.env('MLFLOW_BUCKET')}", extra=("--ignore-existing",))
    log(f"artifacts restored from the archive off the machine: {stats['transfers']} objects, {stats['bytes']} bytes "
        f"in {stats['seconds']:.1f} s")
    print(json.dumps(stats))
    return 0


def cmd_schedule(_args: list[str]) -> int:
    interval = float(value("PITR_BASE_BACKUP_HOURS")) * 3600
    log(f"base backups every {interval / 3600:g} h to {archive_url()}, kept {value('PITR_RETENTION_DAYS')} days")
    serve_metrics()
    if off_site():
        threading.Thread(target=artifact_loop, daemon=True).start()
    listed = 0.0
    while True:
        try:
            mine, timeline = current_system_id(), current_timeline()
            # A minute's look costs two queries; the archive is listed only when a base backup may
            # be due (a new timeline, WAL given up, the interval over) or every LIST_SECONDS.
            if time.monotonic() - listed < LIST_SECONDS and not may_be_due(read_state(), timeline, time.time()):
                time.sleep(60)
                continue
            listed = time.monotonic()
            found = backups()
            refused = foreign_archive(found, mine, timeline)
            if refused:
                raise PitrError(refused)
            found = of_one_database(found, mine)
            why = backup_due(found, timeline, dt.datetime.now(dt.timezone.utc), read_given_up(PGDATA))
            if why:
                log(f"a base backup is due: {why}")
                if not found and not read_state().get("error"):
                    # Healthy meanwhile (archiving works): a large database's first base
                    # backup may take longer than a deploy waits for the service. After a
                    # failed one, unhealthy until one succeeds.
                    write_state(ok=True, newest=None, oldest=None, count=0,
                                first_since=read_state().get("first_since") or time.time())
                base_backup()
                retention()
                found = of_one_database(backups(), mine)
            write_state(ok=True, error=None, newest=found[-1]["end"] if found else None,
                        newest_begin=found[-1]["begin"] if found else None,
                        newest_timeline=found[-1]["timeline"] if found else None,
                        oldest=found[0]["end"] if found else None, count=len(found))
        except Exception as exc:  # noqa: BLE001 - ours, the store's, psycopg2's (the database restarting)
            said = str(exc) if isinstance(exc, (PitrError, common.ConfigError)) else f"{type(exc).__name__}: {exc}"
            log(f"{said}; trying again in 60 s")
            write_state(ok=False, error=said[:500])
            time.sleep(60)
            continue
        # A look a minute (a listing of the archive): WAL given up, a new timeline or a copy
        # that is due are acted on within one.
        time.sleep(min(60.0, interval))


def cmd_base_backup(_args: list[str]) -> int:
    base_backup()
    retention()
    return 0


def cmd_health(_args: list[str]) -> int:
    """Healthy while archiving works (its last attempt succeeded), the schedule's last look at
    the archive succeeded and the newest base backup is recent (or the first is being taken)."""
    seen = archiver()
    failed, archived = seen["last_failed_time"], seen["last_archived_time"]
    if failed and (not archived or failed > archived):
        print(f"archiving {seen['last_failed_wal']} fails ({seen['failed_count']} failures; docker compose logs db)")
        return 1
    problem = state_problem(read_state(), time.time())
    if problem:
        print(problem)
    return 1 if problem else 0


def state_problem(state: dict, now: float) -> str:
    """What makes the schedule unhealthy, or "" (unit-tested)."""
    if "ok" not in state:  # the artifact copy's fields alone: no look yet
        return "no look at the archive yet"
    if not state.get("ok"):
        return state.get("error", "the last look at the archive failed")
    if not state.get("newest"):
        # The first one is being taken (it may take longer than a deploy waits): not a fault,
        # unless it takes longer than the interval between base backups.
        since = state.get("first_since")
        if not since:
            return "no base backup yet"
        hours = (now - since) / 3600
        return (f"the first base backup has run for {hours:.1f} hours" if hours > float(value("PITR_BASE_BACKUP_HOURS"))
                else "")
    age = now - dt.datetime.fromisoformat(state["newest"]).timestamp()
    if common.overdue(age, float(value("PITR_BASE_BACKUP_HOURS"))):
        return f"the newest base backup is {age / 3600:.1f} hours old"
    return ""


def cmd_summary(_args: list[str]) -> int:
    state = read_state()
    if "ok" not in state:  # the artifact copy's fields alone: no look yet
        print("no look at the archive yet")
        return 1
    if not state.get("ok"):
        print(f"failing: {state.get('error', '?')[:200]}")
        return 1
    count, lag = waiting_segments(PGDATA, time.time())
    waiting = f"{count} WAL segments waiting, the oldest {lag:.0f} s" if count else "no WAL segment waiting"
    if not state.get("newest"):
        since = state.get("first_since")
        print(f"the first base backup is being taken (for {time.time() - since:.0f} s); {waiting}" if since
              else f"no base backup yet; {waiting}")
        return 1
    began = dt.datetime.fromisoformat(state.get("newest_begin") or state["newest"]).timestamp()
    open_incidents = [i for i in read_given_up(PGDATA).get("incidents", []) if i["last_at"] > began]
    if open_incidents:
        waiting += (f"; {sum(i['count'] for i in open_incidents)} WAL segments GIVEN UP since about "
                    f"{dt.datetime.fromtimestamp(open_incidents[0]['first_closed'], dt.timezone.utc):%Y-%m-%d %H:%M} "
                    "UTC (the volume was nearly full): no restore to a moment after that until the next base backup")
    copied = (state.get("artifacts") or {}).get("at")
    artifacts = (f"; artifacts copied off the machine {time.time() - copied:.0f} s ago" if copied
                 else "; artifacts not yet copied off the machine" if artifact_copy_due({}, 0) else "")
    if state.get("artifacts_error"):
        artifacts += f" (the last copy FAILED: {state['artifacts_error'][:200]})"
    print(f"restores back to {state['oldest'][:19]} UTC ({state['count']} base backups, newest "
          f"{state['newest'][:19]} UTC); {waiting}{artifacts}")
    return 0


def cmd_status(_args: list[str]) -> int:
    print(json.dumps({"archive": archive_url(), "backups": backups(), **archiver()}, indent=1))
    return 0


def cmd_flush(args: list[str]) -> int:
    """Close the WAL segment being written and wait until the archive has it: then the
    archive holds every write committed before this call."""
    timeout = float(args[0]) if args else 300.0
    if archiver()["archive_mode"] != "on":
        raise PitrError("the database does not archive its WAL (archive_mode is off): redeploy with "
                        "./stack_deploy.sh, which turns it on")
    before = read_given_up(PGDATA)
    # A commit now: recovery to a time stops at the first commit after it, and fails if the
    # archive has none (a quiet database).
    query("SELECT txid_current()")
    segment = query("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + timeout
    while True:
        seen = archiver()
        # Segment names sort by timeline, then position (a history file sorts before them).
        if (seen["last_archived_wal"] or "") >= segment:
            if read_given_up(PGDATA) != before:
                raise PitrError("WAL was given up while the archive was being brought up to date (it failed and "
                                "the database's volume is nearly full): the archive lacks the latest writes. Nothing "
                                "was restored; free space, fix the archive (docker compose logs db), and try again")
            log(f"the archive has every write up to now (segment {segment})")
            return 0
        if time.monotonic() > deadline:
            raise PitrError(f"the archive did not receive WAL segment {segment} within {timeout:.0f} s (last "
                            f"failure: {seen['last_failed_wal']} at {seen['last_failed_time']}); see the db "
                            "service's log for why archiving fails")
        time.sleep(0.5)


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def histories() -> dict[int, dict]:
    """The archive's timeline history files (one per restore so far): for timeline k, when
    it began (the file's upload time: the restore's promotion) and its ancestry, each
    earlier timeline with the WAL position where k's history left it."""
    client = common.s3_client()
    bucket = value("PITR_BUCKET")
    found: dict[int, dict] = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{SERVER_NAME}/wals/")
    for obj in (o for page in pages for o in page.get("Contents", [])):
        match = re.fullmatch(rf"{SERVER_NAME}/wals/([0-9A-F]{{8}})\.history(\.gz)?", obj["Key"])
        if not match:
            continue
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        found[int(match.group(1), 16)] = {"began": obj["LastModified"].astimezone(dt.timezone.utc).isoformat(),
                                          "text": (gzip.decompress(body) if match.group(2) else body).decode()}
    return {k: {"began": v["began"], "leaves": parse_history(v["text"])} for k, v in found.items()}


def parse_history(text: str) -> dict[int, int]:
    """A timeline history file's lines ("1\t0/3000000\tbefore 2026-...") as {parent: switch LSN}."""
    leaves = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip().isdigit():
            leaves[int(fields[0])] = lsn(fields[1].strip())
    return leaves


def timeline_at(history: dict[int, dict], target: dt.datetime) -> int:
    """The timeline the database ran on at `target`: the newest that had begun by then. A
    moment between a restore's target and the restore itself is on the history that restore
    left behind, which is still in the archive (unit-tested)."""
    begun = [k for k, h in history.items() if dt.datetime.fromisoformat(h["began"]) <= target]
    return max(begun, default=1)


def choose(found: list[dict], target: dt.datetime, now: dt.datetime,
           history: dict[int, dict] | None = None) -> tuple[dict, int]:
    """The base backup a restore to `target` starts from, and the timeline to follow: the
    newest backup that ended before `target` (a base backup is consistent only from its end
    on) on that timeline or on one of its ancestors before the point its history left it.
    Unit-tested."""
    history = history or {}
    if target > now:
        raise PitrError(f"{target.isoformat()} is in the future (it is {now.isoformat(timespec='seconds')} now)")
    if not found:
        raise PitrError("the archive has no base backup yet: the pitr service takes one when it starts "
                        "(./show_all.sh shows it); there is nothing to restore from")
    timeline = timeline_at(history, target)
    ancestry = {**history.get(timeline, {}).get("leaves", {}), timeline: None}

    def on_path(b: dict) -> bool:
        if b["timeline"] not in ancestry:
            return False
        left = ancestry[b["timeline"]]
        return left is None or (b.get("end_lsn") is not None and lsn(b["end_lsn"]) <= left)

    usable = [b for b in found if dt.datetime.fromisoformat(b["end"]) <= target and on_path(b)]
    if not usable:
        first = found[0]["end"]
        raise PitrError(f"{target.isoformat()} is before the oldest base backup it can start from ended (the "
                        f"archive reaches back to {first}, PITR_RETENTION_DAYS); restore a logical set "
                        "(db/db_volume_restore.sh SET) for an earlier state")
    return usable[-1], timeline


def cmd_plan(args: list[str]) -> int:
    (text,) = args
    target = parse_time(text)
    # From another archive (--from-archive): its newest database's; else the running one's.
    mine = "" if os.environ.get("PITR_FROM_ARCHIVE") == "1" else current_system_id()
    chosen, timeline = choose(of_one_database(backups(), mine), target, dt.datetime.now(dt.timezone.utc),
                              histories())
    # The record of WAL given up is this database's (not another archive's).
    why = across_given_up(chosen, target, read_given_up(PGDATA) if mine else {})
    if why:
        raise PitrError(why)
    print(json.dumps({"target": pg_time(target), "target_iso": target.isoformat(), "backup": chosen,
                      "timeline": timeline}))
    return 0


def across_given_up(chosen: dict, target: dt.datetime, given_up: dict) -> str:
    """Why a restore from base backup `chosen` to `target` would need WAL that was given up, or ""
    (unit-tested). The segments given up hold writes from before they were closed; a replay
    from a base backup that began before the last of them, to a moment after the first one
    was closed less PITR_ARCHIVE_SECONDS (a busy database fills a segment faster; a quiet one
    may have begun it earlier, and then the replay stops, caught by wait-recovered), needs them."""
    began = dt.datetime.fromisoformat(chosen["begin"]).timestamp()
    for incident in (given_up or {}).get("incidents", []):
        start = incident["first_closed"] - float(value("PITR_ARCHIVE_SECONDS"))
        if began <= incident["last_at"] and target.timestamp() >= start:
            return (f"the archive lacks WAL from about "
                    f"{dt.datetime.fromtimestamp(start, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({incident['count']} "
                    "segments given up while the database's volume was nearly full) up to the next base backup: "
                    "choose a moment before that, or after the next base backup (./show_all.sh). Nothing was changed")
    return ""


def recovery_settings(target: str, timeline: int, bucket: str) -> str:
    # The timeline named, not 'latest': a moment that a later restore went back before is
    # on the history that restore left, not on the newest one. The bucket named: the one
    # restored from, which after a lost machine is not the new PITR_BUCKET.
    return (f"\n{RECOVERY_MARK}\n"
            f"restore_command = 'python3 /usr/local/bin/mlflow-stack-pitr fetch %f %p {bucket}'\n"
            f"recovery_target_time = '{target}'\n"
            f"recovery_target_timeline = '{timeline}'\n"
            "recovery_target_action = 'promote'\n")


def cmd_restore(args: list[str]) -> int:
    target, backup_id, timeline = args
    if not PGDATA.is_dir():
        raise PitrError(f"{PGDATA} is not mounted")
    # The record of WAL given up concerns the history restores may still go to: kept.
    given_up = (PGDATA / GIVEN_UP).read_bytes() if (PGDATA / GIVEN_UP).exists() else None
    # The data folder is the volume's root: its content goes, the folder stays (the caller
    # took a safety copy first).
    for child in PGDATA.iterdir():
        subprocess.run(["rm", "-rf", "--", str(child)], check=True)
    log(f"fetching base backup {backup_id}")
    done = barman("restore", archive_url(), SERVER_NAME, backup_id, str(PGDATA), capture=True)
    if done.returncode != 0:
        raise PitrError(f"fetching base backup {backup_id} failed: {(done.stderr or done.stdout).strip()[-800:]}")
    if given_up is not None:
        (PGDATA / GIVEN_UP).parent.mkdir(mode=0o700, exist_ok=True)
        (PGDATA / GIVEN_UP).write_bytes(given_up)
    with open(PGDATA / "postgresql.auto.conf", "a", encoding="utf-8") as conf:
        conf.write(recovery_settings(target, int(timeline), value("PITR_BUCKET")))
    (PGDATA / "recovery.signal").touch()
    os.chmod(PGDATA, 0o700)
    log(f"the data folder is base backup {backup_id}, set to replay the archive up to {target}")
    return 0


def postmaster_start(pgdata: Path) -> str:
    """When the running postmaster started (postmaster.pid's third line), or "" (none runs)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return ""
    return lines[2] if len(lines) > 2 else ""


# Starts of the database during one recovery after which it is taken as failing: a recovery
# that fails (a FATAL) stops PostgreSQL, and Docker starts it again, to fail the same way.
RECOVERY_STARTS = 3


def cmd_wait_recovered(args: list[str]) -> int:
    timeout = float(args[0]) if args else 3600.0
    deadline = time.monotonic() + timeout
    last = ""
    starts: set[str] = set()
    while time.monotonic() < deadline:
        started = postmaster_start(PGDATA)
        if started:
            starts.add(started)
        if len(starts) >= RECOVERY_STARTS:
            raise PitrError(f"the database started {len(starts)} times without finishing its recovery: its log "
                            "(docker compose logs db) says why; 'recovery ended before configured recovery target "
                            "was reached' means the archive lacks WAL up to the moment")
        try:
            if not query("SELECT pg_is_in_recovery()")[0][0]:
                break
            replayed = query("SELECT pg_last_xact_replay_timestamp()")[0][0]
            now = f"replayed up to {replayed:%Y-%m-%d %H:%M:%S} UTC" if replayed else "replaying"
        except Exception as exc:  # noqa: BLE001 - not up yet, or restarting
            now = f"not answering yet ({type(exc).__name__})"
        if now != last:
            log(now)
            last = now
        time.sleep(1)
    else:
        raise PitrError(f"the database did not finish its recovery within {timeout:.0f} s: see the db service's log")
    for name in ("restore_command", "recovery_target_time", "recovery_target_timeline", "recovery_target_action"):
        query(f"ALTER SYSTEM RESET {name}")
    query("SELECT pg_reload_conf()")
    log("recovered: the database takes writes again (on a new timeline)")
    return 0


COMMANDS = {"archive": cmd_archive, "fetch": cmd_fetch, "schedule": cmd_schedule, "base-backup": cmd_base_backup,
            "health": cmd_health, "status": cmd_status, "summary": cmd_summary, "flush": cmd_flush, "plan": cmd_plan,
            "restore": cmd_restore, "wait-recovered": cmd_wait_recovered, "artifacts-copy": cmd_artifacts_copy,
            "artifacts-restore": cmd_artifacts_restore}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (PitrError, common.ConfigError, settings.SettingError) as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
