#!/usr/bin/env python3
"""Backups of the MLflow stack, run inside the `backup` container.

The container is built from the PostgreSQL image (so pg_dump/pg_restore match
the server) plus boto3, sits on the stack's backend network and writes sets
to /backups (a bind mount of BACKUP_DIR on the host).

  backup [--keep N] [--kind K]   write one set, print its name last
  cold [--keep N]                archive the stopped stack's volumes (mounted under /volumes)
  verify SET                     check a set against its manifest
  restore SET                    replace database and bucket with SET, then check counts
  restore-cold SET               put a cold set's archives back into the (stopped) volumes
  counts                         current row counts as JSON
  schedule                       loop: a backup every BACKUP_INTERVAL_HOURS, keeping BACKUP_KEEP
  health                         exit 0 if the last good scheduled backup is recent enough

A set is a folder mlflow-backup-<UTC time>[-<kind>] with:
  db.dump          pg_dump -Fc (a consistent snapshot while clients keep writing)
  auth.dump        the same for the user store (<db>_auth), when authentication is on
  bucket.tar       every object of the artifact bucket, key = member name
  versions.json    MLflow version, schema revision, images
  manifest.json    row counts per table, objects (count, bytes, sha256 per key), sha256 per file
  manifest.sha256  sha256 of manifest.json
The database is dumped first, then the bucket, so a set may hold an object
logged after the dump but never a row whose object it lacks. A set is written
under a hidden .partial name and renamed when complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from stack import common, settings

ROOT = Path(os.environ.get("BACKUP_ROOT", "/backups"))
VOLUMES = Path("/volumes")
SET_PREFIX = "mlflow-backup-"
SET_NAME = re.compile(r"^mlflow-backup-(\d{8}T\d{6}Z)(?:-([a-z-]+))?$")
DATA_FILES = ("db.dump", "bucket.tar", "versions.json")
LAST_GOOD = ".last-scheduled-backup"
FORMAT = 1
MiB = 1 << 20


class BackupError(Exception):
    """A backup or restore cannot go on; the message says why and what to do."""


def log(message: str) -> None:
    print(f"backup: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- PostgreSQL ------------------------------------------------------------

def pg_env() -> dict[str, str]:
    p = common.postgres_params()
    return {**os.environ, "PGHOST": p["host"], "PGPORT": p["port"], "PGUSER": p["user"],
            "PGPASSWORD": p["password"], "PGDATABASE": p["dbname"], "PGCONNECT_TIMEOUT": "10"}


def pg(*args: str, stdin=None, stdout=None, db: str | None = None) -> str:
    env = pg_env()
    if db:
        env["PGDATABASE"] = db
    result = subprocess.run(list(args), env=env, stdin=stdin,
                            stdout=stdout if stdout is not None else subprocess.PIPE,
                            stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        raise BackupError(f"{args[0]} failed: {result.stderr.decode(errors='replace').strip()[-1500:]}")
    return result.stdout.decode().strip() if stdout is None else ""


def psql(sql: str, db: str | None = None) -> str:
    return pg("psql", "-v", "ON_ERROR_STOP=1", "-Atc", sql, db=db)


def table_counts(db: str | None = None) -> dict[str, int]:
    tables = psql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                  "AND table_type = 'BASE TABLE' ORDER BY 1", db=db).split()
    if not tables:
        return {}
    sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM \"{t}\"" for t in tables)
    return {name: int(n) for name, n in (row.split("|") for row in psql(sql, db=db).splitlines())}


def alembic_version(db: str | None = None) -> str | None:
    if psql("SELECT to_regclass('public.alembic_version') IS NOT NULL", db=db) != "t":
        return None
    return psql("SELECT version_num FROM alembic_version", db=db) or None


def auth_db() -> str | None:
    """The basic-auth user store, if this stack has one."""
    name = common.auth_database()
    exists = psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'", db="postgres")
    return name if exists == "1" else None


def drop_database(name: str) -> None:
    """DROP DATABASE, first without FORCE: PostgreSQL then stops an autovacuum worker in it by
    itself, where FORCE needs the right to signal it, which a role that is not a superuser (an
    external server's) lacks ("permission denied to terminate process", seen after a check's
    restore). FORCE only for sessions still connected, which the stack's own role may end."""
    try:
        pg("dropdb", "--if-exists", name, db="postgres")
    except BackupError:
        # Asked, not read from the message (a server may answer in another language).
        sessions = psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                        f"AND datname = '{name}'", db="postgres")
        if sessions in ("", "0"):
            raise
        pg("dropdb", "--if-exists", "--force", name, db="postgres")


def inspect_dump(dump: Path) -> tuple[dict[str, int], str | None]:
    """Restore the dump into a scratch database: proves it restores, and counts
    exactly what it holds (the live database has moved on since the snapshot)."""
    scratch = f"mlflow_backup_check_{os.getpid()}"
    drop_database(scratch)
    pg("createdb", scratch, db="postgres")
    try:
        with open(dump, "rb") as fh:
            pg("pg_restore", "--no-owner", "--no-acl", "--exit-on-error", "-d", scratch, stdin=fh)
        return table_counts(scratch), alembic_version(scratch)
    finally:
        drop_database(scratch)


# --- S3 --------------------------------------------------------------------

def s3():
    return common.s3_client()


def bucket() -> str:
    return os.environ["MLFLOW_BUCKET"]


def list_objects(client) -> list[dict]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket()):
        out.extend(page.get("Contents", []))
    return out


def export_bucket(client, dest: Path) -> dict:
    """Stream every object into a tar; return count, bytes and sha256 per key."""
    digests: dict[str, str] = {}
    total = 0
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for obj in list_objects(client):
            body = client.get_object(Bucket=bucket(), Key=obj["Key"])["Body"]
            info = tarfile.TarInfo(obj["Key"])
            info.size = obj["Size"]
            info.mtime = obj["LastModified"].timestamp()
            hashing = _HashingReader(body)
            tar.addfile(info, hashing)
            digests[obj["Key"]] = hashing.hexdigest()
            total += obj["Size"]
    return {"count": len(digests), "bytes": total, "sha256": digests}


class _HashingReader:
    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size=-1):
        # A network body may return fewer bytes than asked for; tarfile treats
        # a short read as the end of data, so fill the request or reach EOF.
        if size is None or size < 0:
            data = self.raw.read()
        else:
            parts, missing = [], size
            while missing > 0:
                chunk = self.raw.read(missing)
                if not chunk:
                    break
                parts.append(chunk)
                missing -= len(chunk)
            data = b"".join(parts)
        self.digest.update(data)
        return data

    def hexdigest(self):
        return self.digest.hexdigest()


def bucket_digests(client) -> dict[str, str]:
    result = {}
    for obj in list_objects(client):
        reader = _HashingReader(client.get_object(Bucket=bucket(), Key=obj["Key"])["Body"])
        for _ in iter(lambda: reader.read(MiB), b""):
            pass
        result[obj["Key"]] = reader.hexdigest()
    return result


# --- Sets ------------------------------------------------------------------

def set_name(kind: str | None = None) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{SET_PREFIX}{stamp}" + (f"-{kind}" if kind else "")


def list_sets(root: Path = ROOT) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and SET_NAME.match(p.name))


def rotate(keep: int, kind: str | None = None, root: Path = ROOT) -> list[Path]:
    """Keep the newest `keep` sets of one kind (manual, scheduled or cold).

    Safety sets (pre-restore, pre-upgrade) are never rotated away, and one
    kind's retention never deletes another kind's sets.
    """
    if keep < 1:
        raise BackupError("--keep must be 1 or more")
    same = [p for p in list_sets(root) if SET_NAME.match(p.name).group(2) == kind]
    doomed = same[:-keep]
    for path in doomed:
        shutil.rmtree(path)
        log(f"removed old set {path.name} (--keep {keep})")
    return doomed


def _new_set(kind: str | None, root: Path) -> tuple[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    name = set_name(kind)
    while (root / name).exists() or (root / f".{name}.partial").exists():
        time.sleep(1)
        name = set_name(kind)
    partial = root / f".{name}.partial"
    partial.mkdir(mode=0o700)
    return name, partial


def _finish(partial: Path, manifest: dict, root: Path, name: str) -> Path:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (partial / "manifest.json").write_text(text)
    (partial / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    final = root / name
    partial.rename(final)
    _give_to_owner(final, root)
    return final


def _give_to_owner(path: Path, root: Path) -> None:
    """Files belong to whoever owns the backup folder on the host, not to root."""
    st = root.stat()
    for p in [path, *path.rglob("*")]:
        os.chown(p, st.st_uid, st.st_gid)


def mlflow_version() -> str:
    """Given by the host scripts, which ask the running server's image; the
    scheduled service asks /version, which answers only with authentication off
    (the schema revision in the manifest identifies the data either way)."""
    if os.environ.get("STACK_MLFLOW_VERSION"):
        return os.environ["STACK_MLFLOW_VERSION"]
    url = os.environ["MLFLOW_INTERNAL_URL"] + "/version"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode().strip()
    except OSError:
        return "unknown (server not reachable)"


def create(kind: str | None = None, keep: int | None = None, root: Path = ROOT) -> Path:
    # Garbage collection waits while a backup runs (and a backup while gc does).
    with common.maintenance_lock("backup"):
        return _create(kind, keep, root)


def _create(kind: str | None, keep: int | None, root: Path) -> Path:
    started = time.monotonic()
    name, partial = _new_set(kind, root)
    try:
        log(f"dumping database {os.environ['POSTGRES_DB']} (pg_dump -Fc)")
        with open(partial / "db.dump", "wb") as fh:
            pg("pg_dump", "-Fc", stdout=fh)
        log("checking the dump by restoring it into a scratch database")
        tables, revision = inspect_dump(partial / "db.dump")
        files = list(DATA_FILES)
        auth_tables = None
        users_db = auth_db()
        if users_db:
            log(f"dumping the user database {users_db}")
            with open(partial / "auth.dump", "wb") as fh:
                pg("pg_dump", "-Fc", "-d", users_db, stdout=fh)
            auth_tables, _ = inspect_dump(partial / "auth.dump")
            files.append("auth.dump")
        log(f"copying bucket {bucket()}")
        objects = export_bucket(s3(), partial / "bucket.tar")
        version = mlflow_version()
        (partial / "versions.json").write_text(json.dumps({
            "stack": os.environ.get("STACK_VERSION", ""), "mlflow": version, "alembic_version": revision,
            "images": dict(pair.split("=", 1) for pair in os.environ.get("STACK_IMAGES", "").split(",")
                           if "=" in pair),
            "postgres": psql("SHOW server_version"),
        }, indent=2) + "\n")
        manifest = {
            "format": FORMAT, "kind": kind or "manual",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "database": os.environ["POSTGRES_DB"], "bucket": bucket(),
            "stack_version": os.environ.get("STACK_VERSION", ""),
            "mlflow_version": version, "alembic_version": revision,
            "tables": tables, "auth_tables": auth_tables, "objects": objects,
            "files": {f: sha256_file(partial / f) for f in files},
        }
        final = _finish(partial, manifest, root, name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in final.iterdir()) / MiB
    log(f"set {final.name} complete: {tables.get('runs', 0)} runs, {objects['count']} objects, "
        f"{size:.1f} MiB in {time.monotonic() - started:.1f} s")
    if keep:
        rotate(keep, kind, root)
    return final


def create_cold(keep: int | None = None, root: Path = ROOT) -> Path:
    """Archive the volumes as they are on disk; the stack must be stopped."""
    started = time.monotonic()
    name, partial = _new_set("cold", root)
    try:
        files = {}
        for volume in ("db-data", "minio-data"):
            src = VOLUMES / volume
            if not src.is_dir():
                raise BackupError(f"volume {volume} is not mounted at {src}")
            log(f"archiving volume {volume}")
            with tarfile.open(partial / f"{volume}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(src, arcname=".")
            files[f"{volume}.tar"] = sha256_file(partial / f"{volume}.tar")
        manifest = {"format": FORMAT, "kind": "cold",
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": files}
        final = _finish(partial, manifest, root, name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"cold set {final.name} complete in {time.monotonic() - started:.1f} s")
    if keep:
        rotate(keep, "cold", root)
    return final


def verify(set_dir: Path) -> dict:
    """The manifest of a whole, unaltered set, or a BackupError naming the problem."""
    label = set_dir.name
    if not set_dir.is_dir():
        raise BackupError(f"{set_dir} is not a backup set folder")
    manifest_path, sum_path = set_dir / "manifest.json", set_dir / "manifest.sha256"
    if not manifest_path.exists() or not sum_path.exists():
        raise BackupError(f"{label} has no manifest: it is not a complete backup set")
    text = manifest_path.read_bytes()
    if hashlib.sha256(text).hexdigest() != sum_path.read_text().strip():
        raise BackupError(f"{label}/manifest.json does not match manifest.sha256: the set was altered")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackupError(f"{label}/manifest.json is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{label} has manifest format {manifest.get('format')}; this tool reads {FORMAT}")
    for name, digest in manifest["files"].items():
        path = set_dir / name
        if not path.exists():
            raise BackupError(f"{label}/{name} is missing: the set is incomplete; use another set")
        if sha256_file(path) != digest:
            raise BackupError(f"{label}/{name} is damaged (its sha256 differs from the manifest: "
                              "truncated or changed); nothing was restored; use another set")
    return manifest


def restore(set_dir: Path) -> dict:
    with common.maintenance_lock("restore"):
        return _restore(set_dir)


def _restore(set_dir: Path) -> dict:
    """Replace database and bucket with the set's, then prove they match it.

    The caller stops the MLflow server first (no writes while this runs) and
    has taken a safety backup of the current data.
    """
    manifest = verify(set_dir)
    if manifest.get("kind") == "cold":
        raise BackupError(f"{set_dir.name} is a cold set: restore it with restore-cold")
    restore_database(set_dir / "db.dump", os.environ["POSTGRES_DB"], manifest["tables"])
    if manifest.get("auth_tables") is not None:
        restore_database(set_dir / "auth.dump", common.auth_database(), manifest["auth_tables"])
    client = s3()
    restore_bucket(client, set_dir / "bucket.tar")
    log("checking the restored objects against the manifest")
    digests = bucket_digests(client)
    if digests != manifest["objects"]["sha256"]:
        bad = sorted(k for k in manifest["objects"]["sha256"] if digests.get(k) != manifest["objects"]["sha256"][k])
        raise BackupError(f"restored objects differ from the manifest: {len(bad)} wrong or missing, e.g. {bad[:3]}")
    log(f"restored {sum(manifest['tables'].values())} rows in {len(manifest['tables'])} tables and "
        f"{len(digests)} objects; all match the manifest")
    return manifest


def restore_database(dump: Path, db: str, want: dict[str, int]) -> None:
    """Replace database `db` with the dump, then prove its row counts are the set's."""
    log(f"restoring the database {db}")
    drop_database(db)
    pg("createdb", "-O", os.environ["POSTGRES_USER"], db, db="postgres")
    with open(dump, "rb") as fh:
        pg("pg_restore", "--no-owner", "--no-acl", "--exit-on-error", "-d", db, stdin=fh)
    counts = table_counts(db)
    if counts != want:
        diff = {t: (counts.get(t), want.get(t)) for t in sorted({*counts, *want}) if counts.get(t) != want.get(t)}
        raise BackupError(f"restored row counts of {db} differ from the manifest (got, want): {diff}")


def restore_bucket(client, archive: Path) -> None:
    """Empty the bucket, then upload every object of the archive."""
    log("restoring the bucket")
    keys = [o["Key"] for o in list_objects(client)]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket(), Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})
    with tarfile.open(archive, mode="r") as tar:
        for member in tar:
            if member.isfile():
                client.upload_fileobj(tar.extractfile(member), bucket(), member.name)


def restore_cold(set_dir: Path) -> dict:
    manifest = verify(set_dir)
    if manifest.get("kind") != "cold":
        raise BackupError(f"{set_dir.name} is not a cold set: restore it with restore")
    for volume in ("db-data", "minio-data"):
        dest = VOLUMES / volume
        if not dest.is_dir():
            raise BackupError(f"volume {volume} is not mounted at {dest}")
        log(f"restoring volume {volume}")
        for child in dest.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        with tarfile.open(set_dir / f"{volume}.tar") as tar:
            tar.extractall(dest, filter="fully_trusted" if hasattr(tarfile, "data_filter") else None)
    log("volumes restored")
    return manifest


# --- Schedule --------------------------------------------------------------

def _interval() -> float:
    return float(settings.value("BACKUP_INTERVAL_HOURS", os.environ)) * 3600


def last_good(root: Path = ROOT) -> float | None:
    marker = root / LAST_GOOD
    try:
        return float(marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def schedule(root: Path = ROOT) -> int:
    keep = int(settings.value("BACKUP_KEEP", os.environ))
    interval = _interval()
    log(f"scheduled backups every {interval / 3600:g} h, keeping {keep}")
    if last_good(root) is None:
        # Never a good one yet: the schedule's start is the reference, so that
        # BackupTooOld fires if none succeeds within two intervals.
        write_metrics(root, time.time(), interval)
    while True:
        last = last_good(root)
        due = 0 if last is None else max(0.0, last + interval - time.time())
        if due:
            time.sleep(min(due, 60))
            continue
        try:
            final = create(kind="scheduled", keep=keep, root=root)
            (root / LAST_GOOD).write_text(f"{time.time():.0f} {final.name}\n")
            write_metrics(root, time.time(), interval)
        except Exception as exc:  # noqa: BLE001 - keep the loop alive; health shows the age
            log(f"scheduled backup failed: {exc}; retrying in 10 minutes")
            time.sleep(600)


METRICS_FILE = common.BACKUP_METRICS_FILE


def write_metrics(root: Path, last_good: float, interval: float) -> None:
    """The last good scheduled backup as Prometheus text, for node-exporter's textfile
    collector (profile monitoring; alert BackupTooOld in monitoring/alerts.yml)."""
    text = ("# HELP mlflow_stack_backup_last_good_timestamp_seconds When the last scheduled backup succeeded.\n"
            "# TYPE mlflow_stack_backup_last_good_timestamp_seconds gauge\n"
            f"mlflow_stack_backup_last_good_timestamp_seconds {last_good:.0f}\n"
            "# HELP mlflow_stack_backup_interval_seconds BACKUP_INTERVAL_HOURS, in seconds.\n"
            "# TYPE mlflow_stack_backup_interval_seconds gauge\n"
            f"mlflow_stack_backup_interval_seconds {interval:.0f}\n")
    partial = root / f".{METRICS_FILE}.partial"
    partial.write_text(text)
    partial.chmod(0o644)
    partial.replace(root / METRICS_FILE)  # never half a file for the collector


def health(root: Path = ROOT) -> int:
    last = last_good(root)
    if last is None:
        print("no scheduled backup yet")
        return 1
    age = time.time() - last
    print(f"last good backup {age / 3600:.1f} h ago")
    return 1 if common.overdue(age, _interval() / 3600) else 0


# --- CLI -------------------------------------------------------------------

def _set_arg(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else ROOT / path


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="backup")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backup")
    p.add_argument("--keep", type=int)
    p.add_argument("--kind", choices=["pre-restore", "pre-upgrade", "scheduled"])
    p = sub.add_parser("cold")
    p.add_argument("--keep", type=int)
    for name in ("verify", "restore", "restore-cold"):
        sub.add_parser(name).add_argument("set")
    for name in ("counts", "schedule", "health"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "backup":
            print(create(args.kind, args.keep).name)
        elif args.cmd == "cold":
            print(create_cold(args.keep).name)
        elif args.cmd == "verify":
            manifest = verify(_set_arg(args.set))
            tables = manifest.get("tables", {})
            print(f"kind={manifest.get('kind')} created={manifest.get('created')} "
                  f"mlflow={manifest.get('mlflow_version', '-')} experiments={tables.get('experiments', '-')} "
                  f"runs={tables.get('runs', '-')} objects={manifest.get('objects', {}).get('count', '-')}")
        elif args.cmd == "restore":
            restore(_set_arg(args.set))
        elif args.cmd == "restore-cold":
            restore_cold(_set_arg(args.set))
        elif args.cmd == "counts":
            print(json.dumps(table_counts()))
        elif args.cmd == "schedule":
            return schedule()
        elif args.cmd == "health":
            return health()
    except BackupError as exc:
        print(f"backup: error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
