"""A lost machine: the point-in-time archive off the machine (PITR_S3_ENDPOINT_URL: a second
S3 store started here, with keys of its own, reached as the containers reach another host),
the stack and every volume of it destroyed, a new stack deployed on a new project from the
recovery kit's .env with a new PITR_BUCKET, and its database restored from the old archive
(`--to-time T --from-archive OLD`): every metric point acknowledged before T is back, none
sent after it, asserted on PostgreSQL's rows, and an artifact comes back from its encrypted,
incremental copy off the machine (sha256 compared); the new stack serves and archives on."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import subprocess
import time
import uuid

import pytest

from stack import pins

from .conftest import free_port, new_stack, show, stack_lifetime, wait_for
from .receivers import host_address
from .test_external_stores import write_env
from .test_pitr import make_run, metrics, pitr, points_around_a_moment, steps_in_db

pytestmark = pytest.mark.slow

ARCHIVE_SECONDS = 10
OLD_BUCKET, NEW_BUCKET = "mlflow-pitr", "mlflow-pitr-after-loss"


@pytest.fixture(scope="module")
def offsite(standins):
    """Another S3 store (the stack's own store image, a container of its own) on this
    machine's bridge address: a store the stack reaches only over the network."""
    key, secret = "offsite-archive", secrets.token_urlsafe(24)
    name = f"mlflow-offsite-{uuid.uuid4().hex[:8]}"
    image = standins.get("MINIO_IMAGE") or pins.image_pins()["MINIO_IMAGE"]
    # A port chosen here, so that a stop and start (test_wal_is_given_up...) keeps it.
    host, port = host_address(), free_port()
    subprocess.run(["docker", "run", "-d", "--name", name, "-e", f"MINIO_ROOT_USER={key}",
                    "-e", f"MINIO_ROOT_PASSWORD={secret}", "-p", f"{host}:{port}:9000", image, "server", "/data"],
                   check=True, capture_output=True, text=True)
    try:
        wait_for(lambda: subprocess.run(["docker", "exec", name, "mc", "ready", "local"],
                                        capture_output=True).returncode == 0, 120, "the off-site store to answer")
        yield {"url": f"http://{host}:{port}", "key": key, "secret": secret, "name": name}
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)


def offsite_objects(offsite, bucket: str, prefix: str = "") -> list[str]:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=offsite["url"], aws_access_key_id=offsite["key"],
                      aws_secret_access_key=offsite["secret"], region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                    response_checksum_validation="when_required"))
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def stack(standins, offsite, tmp_path_factory):
    own = new_stack(standins, tmp_path_factory.mktemp("offsite-a"), "mlflowlost")
    own.environ["PITR_ARCHIVE_SECONDS"] = str(ARCHIVE_SECONDS)
    # Any volume counts as nearly full: a WAL segment the archive does not take is given up at once.
    own.environ["PITR_WAL_MIN_FREE_PERCENT"] = "99"
    with stack_lifetime(own, deploy=False) as deployed:
        # Read from .env only, as the stores' locations are.
        write_env(own, {"PITR_S3_ENDPOINT_URL": offsite["url"], "PITR_S3_ACCESS_KEY": offsite["key"],
                        "PITR_S3_SECRET_KEY": offsite["secret"]})
        deployed.deploy()
        yield deployed


def test_the_archive_is_on_the_store_off_the_machine(stack, offsite):
    wait_for(lambda: offsite_objects(offsite, OLD_BUCKET, "stack/base/"), 120, "a base backup off the machine")
    assert offsite_objects(offsite, OLD_BUCKET, "stack/wals/")
    listed = stack.compose("exec", "-T", "mlflow", "python3", "-c", "from stack.common import s3_client; "
                           "print(*sorted(b['Name'] for b in s3_client().list_buckets()['Buckets']))").stdout.split()
    assert OLD_BUCKET not in listed, listed
    assert "restores back to" in stack.script("show_all.sh").stdout


def test_a_key_the_store_refuses_is_said_at_deploy(stack):
    # bucket-init as a deploy runs it, with the artifact store's secret in place of the archive's.
    refused = stack.compose("run", "--rm", "--no-deps", "-T", "-e", "PITR_SECRET_KEY_FILE=/run/secrets/minio_root_password",
                            "bucket-init", check=False)
    assert refused.returncode != 0, refused.stdout
    said = refused.stdout + refused.stderr
    assert "refused the credentials" in said and "PITR_S3_ACCESS_KEY and PITR_S3_SECRET_KEY" in said, said[-2000:]


def test_wal_is_given_up_rather_than_fill_the_volume_and_a_base_backup_follows(stack, offsite):
    """The archive's store down with the database's volume 'nearly full' (PITR_WAL_MIN_FREE_PERCENT=99):
    the segment is given up, the database keeps its writes and takes more, the metric and
    ./show_all.sh say so, and once the store is back a base backup makes the archive whole."""
    run_id = make_run(stack)
    subprocess.run(["docker", "stop", offsite["name"]], check=True, capture_output=True)
    try:
        assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
            "run_id": run_id, "key": "pitr", "value": 1, "timestamp": 0, "step": 1}).status_code == 200
        segment = stack.psql("SELECT pg_walfile_name(pg_switch_wal())")
        # Given up only after it waited ten archive timeouts (a blip costs nothing).
        wait_for(lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment,
                 10 * ARCHIVE_SECONDS + 180, f"PostgreSQL to be done with {segment} (given up)")
        logs = stack.compose("logs", "--no-color", "db").stdout
        assert f"GIVING UP WAL segment {segment}" in logs, logs[-3000:]
        given_up = wait_for(lambda: metrics(stack).get("mlflow_stack_pitr_wal_last_given_up_timestamp_seconds"),
                            180, "the metric of WAL given up")
        assert stack.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
            "run_id": run_id, "key": "pitr", "value": 2, "timestamp": 0, "step": 2}).status_code == 200
    finally:
        subprocess.run(["docker", "start", offsite["name"]], check=True, capture_output=True)
    wait_for(lambda: subprocess.run(["docker", "exec", offsite["name"], "mc", "ready", "local"],
                                    capture_output=True).returncode == 0, 120, "the off-site store back")
    newest = wait_for(lambda: (m := metrics(stack)).get("mlflow_stack_pitr_newest_base_backup_timestamp_seconds",
                                                              0) > given_up and m, 240,
                      "a base backup after the WAL given up (the pitr service looks every minute)")
    assert steps_in_db(stack, run_id) == {1, 2}
    assert "GIVEN UP" not in stack.script("show_all.sh").stdout, newest


def test_a_lost_machine_is_restored_from_the_archive_off_it(stack, offsite, standins, tmp_path_factory):
    run_id = make_run(stack)
    # An artifact, copied off the machine (encrypted) before the loss.
    blob = uuid.uuid4().bytes * 65536
    path = f"/api/2.0/mlflow-artifacts/artifacts/lost/{run_id}/model.bin"
    # pitr copies by itself every PITR_ARTIFACT_COPY_MINUTES; this copy, now, takes what is new.
    copied_before = len(offsite_objects(offsite, OLD_BUCKET, "artifacts/"))
    assert stack.http("PUT", path, data=blob).status_code == 200
    first = json.loads(stack.compose("exec", "-T", "pitr", "python3", "/usr/local/bin/mlflow-stack-pitr",
                                     "artifacts-copy").stdout)
    again = json.loads(stack.compose("exec", "-T", "pitr", "python3", "/usr/local/bin/mlflow-stack-pitr",
                                     "artifacts-copy").stdout)
    assert len(offsite_objects(offsite, OLD_BUCKET, "artifacts/")) > copied_before
    assert again["transfers"] == 0 and again["bytes"] == 0 and again["checks"] >= 1, again
    show(f"artifacts off the machine: a first copy sent {first['transfers']} objects ({first['bytes']} bytes) in "
         f"{first['seconds']:.1f} s; a second, nothing changed, sent {again['bytes']} bytes after "
         f"{again['checks']} checks in {again['seconds']:.1f} s")
    copied = offsite_objects(offsite, OLD_BUCKET, "artifacts/")
    assert copied and not any(run_id in key or "model.bin" in key for key in copied), copied[:5]
    points, target = points_around_a_moment(stack, run_id)
    before = {p[0] for p in points if p[2] < target - dt.timedelta(seconds=1)}
    after = {p[0] for p in points if p[1] > target}
    assert len(before) > 10 and len(after) > 10, (len(before), len(after))
    # What the archive timeout sends off the machine by itself (no flush: the machine dies).
    segment = stack.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    wait_for(lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") >= segment,
             ARCHIVE_SECONDS + 120, f"WAL segment {segment} to be archived off the machine")
    kit = stack.workdir / "kit"
    stack.script("show_all.sh", "--recovery-kit", str(kit))

    # The machine is lost: the stack, its volumes and its folder with it.
    lost_at = time.monotonic()
    stack.script("stack_remove.sh", "--purge", "--yes")
    archived_before = sorted(offsite_objects(offsite, OLD_BUCKET))

    # A new machine: the kit's .env (with a new bucket for the new stack's own archive) and CA.
    new = new_stack(standins, tmp_path_factory.mktemp("offsite-b"), "mlflowfound")
    new.environ["PITR_ARCHIVE_SECONDS"] = str(ARCHIVE_SECONDS)
    env = (kit / "env").read_text().replace(f"PITR_BUCKET={OLD_BUCKET}\n", f"PITR_BUCKET={NEW_BUCKET}\n")
    assert f"PITR_BUCKET={NEW_BUCKET}" in env
    new.env_file.write_text(env)
    new.env_file.chmod(0o600)
    certs = new.workdir / "certs"
    certs.mkdir(mode=0o700)
    for name in ("ca.key", "ca.crt"):
        (certs / name).write_bytes((kit / "certs" / name).read_bytes())
    with stack_lifetime(new) as found:
        written = target.isoformat(sep=" ")
        restored = found.script("db/db_volume_restore.sh", "--to-time", written, "--from-archive", OLD_BUCKET,
                                "--yes")
        took = time.monotonic() - lost_at
        assert "Restored the database to" in restored.stderr, restored.stderr[-2000:]
        steps = steps_in_db(found, run_id)
        assert before <= steps, sorted(before - steps)[:20]
        assert not steps & after, sorted(steps & after)[:20]
        show(f"lost machine: {len(steps)} of {len(points)} points back ({len(before)} acknowledged more than 1 s "
             f"before the moment, none of the {len(after)} sent after it); new stack deployed and restored from "
             f"the archive off the machine in {took:.0f} s")
        # The artifact came back from its encrypted copy, byte for byte.
        read = found.http("GET", path)
        assert read.status_code == 200 and hashlib.sha256(read.content).digest() == hashlib.sha256(blob).digest()
        # The old archive was only read; the new stack archives to its own bucket, on a new timeline.
        assert sorted(offsite_objects(offsite, OLD_BUCKET)) == archived_before
        assert found.http("POST", "/api/2.0/mlflow/runs/log-metric", json={
            "run_id": run_id, "key": "pitr", "value": -1, "timestamp": 0, "step": 10 ** 6}).status_code == 200
        wait_for(lambda: any(b["timeline"] >= 2 for b in json.loads(pitr(found, "status"))["backups"]), 300,
                 "a base backup of the restored database in the new bucket")
        assert offsite_objects(offsite, NEW_BUCKET, "stack/wals/")
