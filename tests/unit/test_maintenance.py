"""Garbage collection (mlflow/maintenance.py) on a real MLflow SQL store (SQLite);
the bucket is an in-memory stand-in that records what is deleted."""

import importlib.util
import sys
import time

import pytest

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("maintenance", ROOT / "mlflow" / "maintenance.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["maintenance"] = gc
_spec.loader.exec_module(gc)

BUCKET = "mlflow"
DAY_MS = 86_400_000


class Bucket:
    """list_objects_v2 pages and delete_objects, as boto3's client has them."""

    def __init__(self, keys):
        self.objects = {k: 10 for k in keys}

    def get_paginator(self, _name):
        bucket = self

        class Paginator:
            def paginate(self, Bucket, Prefix):  # noqa: N803 - boto3's names
                assert Bucket == BUCKET
                yield {"Contents": [{"Key": k, "Size": s} for k, s in sorted(bucket.objects.items())
                                    if k.startswith(Prefix)]}
        return Paginator()

    def delete_objects(self, Bucket, Delete):  # noqa: N803
        for obj in Delete["Objects"]:
            del self.objects[obj["Key"]]


@pytest.fixture
def store(tmp_path):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    s = SqlAlchemyStore(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow-artifacts:/")
    yield s
    s.engine.dispose()


def _experiment(store, name, location=None):
    return store.create_experiment(name, artifact_location=location)


def _run(store, exp_id):
    run = store.create_run(exp_id, "u", int(time.time() * 1000), [], "r")
    return run.info.run_id, run.info.artifact_uri


def _key(uri):
    return gc.bucket_prefix(uri, BUCKET) + "f.bin"


@pytest.mark.parametrize("location,prefix", [
    ("mlflow-artifacts:/3/abc/artifacts", "artifacts/3/abc/artifacts/"),
    ("s3://mlflow/artifacts/3/abc/artifacts", "artifacts/3/abc/artifacts/"),
    ("s3://other-bucket/artifacts/3", None),
    ("s3://mlflow/elsewhere/3", None),
    ("file:///etc", None),
    ("mlflow-artifacts:/3/../../etc", None),
    ("mlflow-artifacts:/", None),
    ("s3://mlflow/artifacts1", None),
    ("s3://mlflow/artifacts-old/3", None),
    ("mlflow-artifacts://otherhost:5000/3/abc", None),
    ("mlflow-artifacts:///3/abc", "artifacts/3/abc/"),
    (None, None),
])
def test_only_locations_inside_the_stacks_store_resolve(location, prefix):
    assert gc.bucket_prefix(location, BUCKET) == prefix


def test_removes_what_was_deleted_long_enough_ago_and_nothing_else(store):
    keep_exp = _experiment(store, "keep", "mlflow-artifacts:/keep")
    gone_exp = _experiment(store, "gone", "mlflow-artifacts:/gone")
    kept_run, kept_uri = _run(store, keep_exp)
    deleted_run, deleted_uri = _run(store, keep_exp)
    in_gone, in_gone_uri = _run(store, gone_exp)
    store.delete_run(deleted_run)
    store.delete_experiment(gone_exp)
    bucket = Bucket([_key(kept_uri), _key(deleted_uri), _key(in_gone_uri), "artifacts/gone/extra.txt",
                     "artifacts/keep/extra.txt"])
    said = []

    # Deleted just now: a 30-day age takes nothing; a dry run takes nothing either.
    assert len(gc.run(store, bucket, BUCKET, 30 * DAY_MS, dry_run=False, say=said.append)) == 0
    dry = gc.run(store, bucket, BUCKET, 0, dry_run=True, say=said.append)
    assert {r.id for r in dry.runs} == {deleted_run, in_gone} and [e.id for e in dry.experiments] == [gone_exp]
    assert len(bucket.objects) == 5 and store.get_run(deleted_run)
    assert any(line.startswith("gc: would remove run " + deleted_run) for line in said)

    gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)
    assert sorted(bucket.objects) == sorted([_key(kept_uri), "artifacts/keep/extra.txt"])
    assert store.get_run(kept_run).info.run_id == kept_run
    for run_id in (deleted_run, in_gone):
        with pytest.raises(Exception, match="not found|does not exist"):
            store.get_run(run_id)
    with pytest.raises(Exception, match="not found|does not exist|No Experiment"):
        store.get_experiment(gone_exp)
    # Again: nothing left to do.
    assert len(gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)) == 0


def test_a_folder_shared_with_an_experiment_that_stays_is_kept(store):
    _experiment(store, "stays", "mlflow-artifacts:/team")
    gone = _experiment(store, "goes", "mlflow-artifacts:/team")
    store.delete_experiment(gone)
    bucket = Bucket(["artifacts/team/model.pkl"])
    said = []
    gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)
    assert list(bucket.objects) == ["artifacts/team/model.pkl"]
    assert any("artifacts/team/ kept: experiment" in line and "uses it" in line for line in said), said


def test_locations_outside_the_store_are_never_touched(store):
    exp = _experiment(store, "foreign", "s3://someone-elses-bucket/data")
    run_id, _ = _run(store, exp)
    store.delete_run(run_id)
    bucket = Bucket(["artifacts/x"])
    said = []
    gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)
    assert list(bucket.objects) == ["artifacts/x"]
    assert any("left alone: not in s3://mlflow/artifacts/" in line for line in said)


def test_the_files_of_a_registered_model_version_survive_its_runs_deletion(store, tmp_path):
    """The registry points at the run's files: `mlflow gc` would delete them."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry

    exp = _experiment(store, "registered", "mlflow-artifacts:/reg")
    run_id, uri = _run(store, exp)
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    registry.create_registered_model("prod-model")
    registry.create_model_version("prod-model", f"{uri}/model", run_id=run_id)
    store.delete_run(run_id)
    store.delete_experiment(exp)
    bucket = Bucket([gc.bucket_prefix(uri, BUCKET) + "model/model.pkl", "artifacts/reg/other.txt"])
    said = []
    gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)
    # The run's folder and the experiment's (which contains it) both stay.
    assert sorted(bucket.objects) == sorted([gc.bucket_prefix(uri, BUCKET) + "model/model.pkl",
                                             "artifacts/reg/other.txt"]), said
    assert any("registered model prod-model version 1 is stored there" in line for line in said), said


def test_an_item_restored_meanwhile_is_kept(store, monkeypatch):
    exp = _experiment(store, "undo", "mlflow-artifacts:/undo")
    run_id, uri = _run(store, exp)
    store.delete_run(run_id)
    bucket = Bucket([_key(uri)])
    real_plan = gc.plan

    def plan_then_restore(*args, **kwargs):
        planned = real_plan(*args, **kwargs)
        store.restore_run(run_id)  # a user restores it while the collection runs
        return planned

    monkeypatch.setattr(gc, "plan", plan_then_restore)
    said = []
    gc.run(store, bucket, BUCKET, 0, dry_run=False, say=said.append)
    assert store.get_run(run_id).info.lifecycle_stage == "active" and list(bucket.objects) == [_key(uri)]
    assert any(f"kept run {run_id}" in line and "restored meanwhile" in line for line in said), said


class Uploads:
    """list_multipart_uploads pages and abort_multipart_upload, as boto3's client has them."""

    def __init__(self, uploads):
        self.uploads = uploads  # key -> (upload id, initiated)

    def get_paginator(self, name):
        assert name == "list_multipart_uploads"
        uploads = self.uploads

        class Paginator:
            def paginate(self, Bucket, Prefix):  # noqa: N803 - boto3's names
                assert Bucket == BUCKET
                yield {"Uploads": [{"Key": k, "UploadId": u, "Initiated": t} for k, (u, t) in sorted(uploads.items())
                                   if k.startswith(Prefix)]}
        return Paginator()

    def abort_multipart_upload(self, Bucket, Key, UploadId):  # noqa: N803
        assert self.uploads[Key][0] == UploadId
        del self.uploads[Key]


def test_unfinished_uploads_older_than_a_day_are_aborted_and_a_dry_run_only_lists_them():
    from datetime import datetime, timedelta, timezone

    now = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
    bucket = Uploads({"artifacts/1/a/model.bin": ("u1", now - timedelta(hours=30)),
                      "artifacts/1/b/data.bin": ("u2", now - timedelta(hours=2)),
                      "elsewhere/x.bin": ("u3", now - timedelta(days=9))})
    said = []
    limit = gc.STALE_UPLOAD_HOURS * 3600
    assert gc.abort_stale_uploads(bucket, BUCKET, limit, True, said.append, now.timestamp()) == 1
    assert len(bucket.uploads) == 3 and said == [
        "gc: would abort an unfinished upload of s3://mlflow/artifacts/1/a/model.bin begun 30.0 h ago"]
    assert gc.abort_stale_uploads(bucket, BUCKET, limit, False, said.append, now.timestamp()) == 1
    # A recent upload may still be running; outside artifacts/ is not the stack's to touch.
    assert set(bucket.uploads) == {"artifacts/1/b/data.bin", "elsewhere/x.bin"}
