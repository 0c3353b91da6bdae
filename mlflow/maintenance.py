"""Garbage collection of deleted runs, experiments and logged models.

`mlflow gc` permanently removes what users deleted (soft deletion keeps rows
and artifacts forever), but under proxied artifacts it reaches the bucket only
through the tracking server's HTTP API (with a login), it has no dry run, and
it knows nothing of backups. This is the same selection and the same store
calls (the SQL store's `_get_deleted_runs`, `_hard_delete_run`, ...), with:

- artifacts deleted straight in the stack's bucket, and only there: a location
  that does not resolve under s3://BUCKET/artifacts/ is reported, never touched;
- the deleted experiments' own folders removed too (with the logged models
  inside them), but never a folder that holds the files of a registered model
  version that still exists (the registry points at them: `mlflow gc` would
  delete a registered run's model) or that an experiment which stays uses;
- each item's state checked again right before it goes (restored meanwhile:
  kept), and its rows deleted before its files, so a failure never leaves a
  restorable item without its artifacts;
- a dry run that lists everything it would remove and changes nothing;
- multipart uploads left unfinished for STALE_UPLOAD_HOURS aborted (their
  parts take space but belong to no object);
- the maintenance lock (stack.common.maintenance_lock), which a backup holds
  for its whole run: gc never runs within a backup, nor a backup within gc.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

from stack import common


# Multipart uploads unfinished for this long are abandoned (MinIO's own default).
STALE_UPLOAD_HOURS = 24


@dataclasses.dataclass
class Item:
    kind: str  # run, logged model, experiment
    id: str
    name: str
    location: str  # artifact URI as stored


@dataclasses.dataclass
class Plan:
    runs: list[Item]
    models: list[Item]
    experiments: list[Item]

    def __len__(self) -> int:
        return len(self.runs) + len(self.models) + len(self.experiments)


def bucket_prefix(location: str | None, bucket: str) -> str | None:
    """The object-key prefix of an artifact location, if it lies in the stack's store."""
    if not location or re.match(r"mlflow-artifacts://[^/]", location):  # another server's
        return None
    for scheme in ("mlflow-artifacts:", f"s3://{bucket}/{common.ARTIFACTS_PREFIX}"):
        if location == scheme or location.startswith(scheme + "/"):
            rest = location[len(scheme):].strip("/")
            parts = rest.split("/")
            if not rest or any(p in ("", ".", "..") for p in parts):
                return None
            return f"artifacts/{rest}/"
    return None


def plan(store, older_than_ms: int, now_ms: int | None = None) -> Plan:
    """What a collection removes: everything deleted more than older_than_ms ago."""
    from mlflow.entities import ViewType

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    run_ids = set(store._get_deleted_runs(older_than=older_than_ms))
    experiments, token = [], None
    while True:
        page = store.search_experiments(view_type=ViewType.DELETED_ONLY, page_token=token,
                                        filter_string=f"last_update_time < {now_ms - older_than_ms}")
        experiments += list(page)
        token = page.token
        if not token:
            break
    exp_ids = [e.experiment_id for e in experiments]
    if exp_ids:  # a deleted experiment takes its deleted runs along (as `mlflow gc`)
        token = None
        while True:
            page = store.search_runs(exp_ids, "", ViewType.DELETED_ONLY, page_token=token)
            run_ids.update(r.info.run_id for r in page)
            token = page.token
            if not token:
                break
    runs = []
    for run_id in sorted(run_ids):
        info = store.get_run(run_id).info
        runs.append(Item("run", run_id, info.run_name or "", info.artifact_uri))
    models = []
    for model_id in sorted(store._get_deleted_logged_models(older_than=older_than_ms)):
        model = store.get_logged_model(model_id, allow_deleted=True)
        models.append(Item("logged model", model_id, model.name or "", model.artifact_location))
    return Plan(runs, models, [Item("experiment", e.experiment_id, e.name, e.artifact_location)
                               for e in sorted(experiments, key=lambda e: int(e.experiment_id))])


def kept_locations(store, leaving: set[str], bucket: str) -> dict[str, tuple[str, bool]]:
    """Key prefixes that must survive: {prefix: (why, inside)}. Nothing that contains
    one may go; with inside, nothing within it either. The folders of the experiments
    that stay (their deleted runs inside may go) and the files of every registered
    model version (the registry's tables live in the tracking store's database here)."""
    import sqlalchemy as sa
    from mlflow.entities import ViewType

    kept, token = {}, None
    while True:
        page = store.search_experiments(view_type=ViewType.ALL, page_token=token)
        for e in page:
            if e.experiment_id not in leaving and (prefix := bucket_prefix(e.artifact_location, bucket)):
                kept[prefix] = (f"experiment {e.experiment_id} ({e.name}) uses it", False)
        token = page.token
        if not token:
            break
    with store.engine.connect() as conn:
        if sa.inspect(conn).has_table("model_versions"):
            for name, version, location in conn.execute(sa.text(
                    "SELECT name, version, storage_location FROM model_versions "
                    "WHERE current_stage <> 'Deleted_Internal'")):
                if prefix := bucket_prefix(location, bucket):
                    kept[prefix] = (f"registered model {name} version {version} is stored there", True)
    return kept


def delete_prefix(client, bucket: str, prefix: str) -> tuple[int, int]:
    """Delete every object under prefix; (objects, bytes)."""
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        contents = page.get("Contents", [])
        if not contents:
            continue
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in contents],
                                                     "Quiet": True})
        count += len(contents)
        size += sum(o["Size"] for o in contents)
    return count, size


def run(store, client, bucket: str, older_than_ms: int, dry_run: bool,
        say: Callable[[str], None] = print) -> Plan:
    """Collect (or, dry, list) what plan() selects; say() one line per item."""
    todo = plan(store, older_than_ms)
    verb = "would remove" if dry_run else "removed"
    kept = kept_locations(store, {e.id for e in todo.experiments}, bucket) if len(todo) else {}

    def artifacts(item: Item) -> str:
        prefix = bucket_prefix(item.location, bucket)
        if prefix is None:
            return f"artifacts at {item.location} left alone: not in s3://{bucket}/artifacts/"
        clash = next((p for p, (_, inside) in kept.items()
                      if p.startswith(prefix) or (inside and prefix.startswith(p))), None)
        if clash:
            return f"artifact folder {prefix} kept: {kept[clash][0]} ({clash})"
        if dry_run:
            return f"s3://{bucket}/{prefix}"
        objects, size = delete_prefix(client, bucket, prefix)
        return f"s3://{bucket}/{prefix} ({objects} objects, {size} bytes)"

    def still_deleted(item: Item) -> bool:
        from mlflow.entities import LifecycleStage

        if item.kind == "run":
            return store.get_run(item.id).info.lifecycle_stage == LifecycleStage.DELETED
        if item.kind == "experiment":
            return store.get_experiment(item.id).lifecycle_stage == LifecycleStage.DELETED
        return item.id in set(store._get_deleted_logged_models())

    hard_delete = {"run": store._hard_delete_run, "logged model": store._hard_delete_logged_model,
                   "experiment": store._hard_delete_experiment}
    for item in [*todo.runs, *todo.models, *todo.experiments]:
        if not dry_run:
            if not still_deleted(item):
                say(f"gc: kept {item.kind} {item.id} ({item.name}): restored meanwhile")
                continue
            hard_delete[item.kind](item.id)  # rows first: a failure never strands a restorable item
        say(f"gc: {verb} {item.kind} {item.id} ({item.name}): {artifacts(item)}")
    say(f"gc: {'dry run, nothing changed: ' if dry_run else ''}{len(todo.runs)} runs, {len(todo.models)} "
        f"logged models, {len(todo.experiments)} experiments deleted more than "
        f"{older_than_ms / 86_400_000:g} days ago")
    return todo


def abort_stale_uploads(client, bucket: str, older_than_s: float, dry_run: bool,
                        say: Callable[[str], None] = print, now: float | None = None) -> int:
    """Abort the multipart uploads under artifacts/ begun more than older_than_s ago.

    A client that dies in the middle of a multipart artifact upload leaves its
    parts in the store, unlisted and counted against the disk. MinIO drops them
    after a day by itself (its api stale_uploads_expiry); other S3 stores keep
    them until a lifecycle rule or this removes them. Returns how many."""
    from botocore.exceptions import BotoCoreError, ClientError

    now = time.time() if now is None else now
    count = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=common.ARTIFACTS_PREFIX + "/"):
            for upload in page.get("Uploads", []):
                age = now - upload["Initiated"].timestamp()
                if age <= older_than_s:
                    continue
                if not dry_run:
                    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                count += 1
                say(f"gc: {'would abort' if dry_run else 'aborted'} an unfinished upload of "
                    f"s3://{bucket}/{upload['Key']} begun {age / 3600:.1f} h ago")
    except (BotoCoreError, ClientError) as exc:
        # The collection itself is done; a store that does not allow this is no reason to fail it.
        say(f"gc: WARNING: unfinished uploads not checked: {exc}")
    return count


def collect(older_than_days: float, dry_run: bool, environ=None) -> Plan:
    """One collection against the stack's database and bucket, under the maintenance lock."""
    import internals
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    internals.require("garbage collection (mlflow/maintenance.py)", modules={internals.STORE})

    bucket = common.env("MLFLOW_BUCKET", environ=environ)
    with common.maintenance_lock("gc", environ):
        store = SqlAlchemyStore(common.database_uri(environ), f"s3://{bucket}/{common.ARTIFACTS_PREFIX}")
        try:
            client = common.s3_client(environ)
            todo = run(store, client, bucket, int(older_than_days * 86_400_000), dry_run)
            abort_stale_uploads(client, bucket, STALE_UPLOAD_HOURS * 3600, dry_run)
            return todo
        finally:
            store.engine.dispose()
