"""A full disk, on a deployment of its own (profile monitoring) whose object
store lives on a small file system: a tmpfs volume of SIZE_MIB, created before
the deploy under the name Compose gives the minio-data volume.

- An artifact that fits is stored. One larger than the space left is refused
  within seconds with a 507 that says what is full and what to do, both ways
  an upload goes: in presigned parts to the S3 port (nginx gives the advice)
  and through the server; MLflow's client does not retry a 507. Nothing of it
  stays: no object, no unfinished multipart upload.
- Filled up (8 MiB objects, then 256 KiB ones, until the store refuses one), the volume fires
  VolumeNearlyFull (node-exporter's view) and ObjectStoreNearlyFull (MinIO's
  capacity metrics). The deployment runs monitoring/alerts.yml with every
  `for:` window shortened to WINDOW (PROMETHEUS_ALERT_RULES), so they fire within a minute.
- The server's healthcheck fails, saying why, while the database does not answer,
  and passes again once it is back.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid

import pytest

from .conftest import ROOT, new_stack, show, stack_lifetime, wait_for
from .test_monitoring import api
from .test_stack import s3_client

pytestmark = pytest.mark.slow

SIZE_MIB = 192
WINDOW = "20s"


@pytest.fixture(scope="module")
def small(standins, tmp_path_factory):
    the_stack = new_stack(standins, tmp_path_factory.mktemp("fulldisk"), "mlflowfull")
    the_stack.environ["COMPOSE_PROFILES"] = "monitoring"
    # The shipped rules, each window shortened, so an alert fires within the test.
    rules = the_stack.workdir / "alerts-short.yml"
    shipped = (ROOT / "monitoring" / "alerts.yml").read_text()
    rules.write_text(re.sub(r"(?m)^(\s+for:) \d+[smh]$", rf"\1 {WINDOW}", shipped))
    assert rules.read_text() != shipped
    the_stack.environ["PROMETHEUS_ALERT_RULES"] = str(rules)
    project = the_stack.project
    subprocess.run(["docker", "volume", "create", "--driver", "local", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
                    "--opt", f"o=size={SIZE_MIB}m", "--label", f"com.docker.compose.project={project}",
                    "--label", "com.docker.compose.volume=minio-data", f"{project}_minio-data"],
                   check=True, capture_output=True)
    with stack_lifetime(the_stack) as deployed:  # its --purge removes the volume too
        yield deployed


@pytest.fixture(scope="module")
def tag():
    return uuid.uuid4().hex[:8]


def upload(stack, mib: int, tag: str, extra: dict | None = None) -> dict:
    result = stack.client(str(mib), tag, script="full_client.py", timeout=600, extra=extra)
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_bucket(stack, artifact_uri: str) -> dict:
    client, bucket = s3_client(stack), stack.values()["MLFLOW_BUCKET"]
    prefix = "artifacts/" + artifact_uri.split("mlflow-artifacts:/", 1)[1].strip("/") + "/"
    objects = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return {"objects": [o["Key"] for o in objects], "unfinished uploads": [u["Key"] for u in uploads]}


def test_a_full_store_refuses_an_upload_at_once_with_the_reason(small, tag):
    fits = upload(small, 40, tag)
    assert fits["ok"], fits
    assert len(in_bucket(small, fits["artifact_uri"])["objects"]) == 1

    # With the printed settings a file this size goes to the S3 port in presigned parts, where
    # nginx puts the advice into the store's 507; forced through the server, the server answers
    # (and logs) it. One after the other: the stand-in store (SeaweedFS) does not give back at
    # once the room of parts an aborted upload had stored, as MinIO does.
    for way, extra, logged in (("in parts to the S3 port", {}, 0),
                               ("through the server", {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}, 1)):
        before = small.compose("logs", "--no-color", "mlflow").stdout.count("artifact upload refused with 507")
        too_big = upload(small, SIZE_MIB * 2, tag, extra)
        show(f"{SIZE_MIB * 2} MiB into a {SIZE_MIB} MiB store, {way}: refused after {too_big['seconds']} s "
             f"(the whole upload included): {too_big['error'][:400]}")
        assert not too_big["ok"], way
        error = too_big["error"]
        assert "507" in error and "artifact store is full" in error and "./stack_gc.sh" in error, (way, error)
        # Answered once, not retried: the server logged one refusal (none for parts it never saw).
        logs = small.compose("logs", "--no-color", "mlflow").stdout
        assert logs.count("artifact upload refused with 507") - before == logged, (way, logs[-3000:])
        left = in_bucket(small, too_big["artifact_uri"])
        assert left["objects"] == [], (way, left)
        if left["unfinished uploads"]:
            # A refused upload is aborted (by s3transfer in the server, by MLflow's client for
            # presigned parts); a part still in flight then can leave it listed (seen once on
            # the stand-in). gc's stale-upload rule removes it: here with no minimum age.
            code = ("import maintenance; from stack import common; "
                    "maintenance.abort_stale_uploads(common.s3_client(), common.env('MLFLOW_BUCKET'), 0, False)")
            out = small.compose("exec", "-T", "mlflow", "python3", "-c", code).stdout
            show(f"unfinished upload left by the refused one, aborted by gc's rule: {out.strip()}")
        assert in_bucket(small, too_big["artifact_uri"]) == {"objects": [], "unfinished uploads": []}, way
    # What was stored before is intact.
    assert len(in_bucket(small, fits["artifact_uri"])["objects"]) == 1


def fill(stack) -> int:
    """Objects of 8 MiB straight into the bucket until the store refuses one, then of 256 KiB
    until it refuses one of those with 507 XMinioStorageFull: whatever a store frees after an
    aborted upload, it is full now. (The store refuses before reading the body and closes the
    connection after at most a little of it, as Go's server does: while nginx is still
    streaming a large body it may meet the reset before the answer and give a 502. A body of
    256 KiB is read whole, so its 507 arrives.)"""
    from botocore.exceptions import ClientError

    client, bucket = s3_client(stack), stack.values()["MLFLOW_BUCKET"]
    stored = 0
    # At most: the store's size in 8 MiB objects; then what an 8 MiB refusal leaves (under
    # 8 MiB and the 1% MinIO keeps) in 256 KiB ones.
    for size, most in ((8 << 20, SIZE_MIB // 8 + 2), (256 << 10, 4 * (8 + 2))):
        for _ in range(most):
            try:
                client.put_object(Bucket=bucket, Key=f"filler/{stored}", Body=b"\0" * size)
                stored += 1
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                if size == 256 << 10:
                    assert code == "XMinioStorageFull", exc.response
                    return stored
                assert code in ("XMinioStorageFull", "502"), exc.response
                break
        else:
            raise AssertionError(f"{SIZE_MIB} MiB store took {stored} objects (the last {size} bytes)")
    raise AssertionError("not reached")


def test_the_nearly_full_volume_fires_the_disk_alerts(small):
    fill(small)
    def firing():
        states = {(a["labels"]["alertname"], a["labels"].get("mountpoint", "")): a["state"]
                  for a in api(small, "alerts")["alerts"]}
        wanted = {("VolumeNearlyFull", "/volumes/minio"), ("ObjectStoreNearlyFull", "")}
        return states if all(states.get(w) == "firing" for w in wanted) else None

    # A scrape (15 s) and a rule evaluation (15 s) after the volume filled, then the window.
    states = wait_for(firing, 180, "VolumeNearlyFull for /volumes/minio and ObjectStoreNearlyFull to fire",
                      interval=5, detail=lambda: [(a["labels"], a["state"]) for a in api(small, "alerts")["alerts"]])
    show(f"alerts after the store filled: {states}")
    # The one filled is the small tmpfs volume...
    size = api(small, "query", query='node_filesystem_size_bytes{mountpoint="/volumes/minio"}')["result"]
    assert [(r["metric"]["fstype"], float(r["value"][1])) for r in size] == [("tmpfs", SIZE_MIB << 20)], size

    # ...and the alert names exactly the volumes below 10% free. The others sit on the host's disk,
    # which may itself be nearly full (it was on one CI machine): then they are rightly named too.
    def agree():
        ratios = {r["metric"]["mountpoint"]: float(r["value"][1]) for r in api(
            small, "query", query='node_filesystem_avail_bytes{mountpoint=~"/volumes/.*"}'
                                  ' / node_filesystem_size_bytes{mountpoint=~"/volumes/.*"}')["result"]}
        named = {a["labels"]["mountpoint"] for a in api(small, "alerts")["alerts"]
                 if a["labels"]["alertname"] == "VolumeNearlyFull"}
        low = {mount for mount, ratio in ratios.items() if ratio < 0.10}
        # A ratio within a hair of the threshold may cross it between scrape and evaluation.
        unsure = {mount for mount, ratio in ratios.items() if abs(ratio - 0.10) < 0.002}
        return (named ^ low) <= unsure and "/volumes/minio" in named and len(ratios) >= 3
    wait_for(agree, 180, "VolumeNearlyFull to name exactly the volumes below 10% free", interval=5,
             detail=lambda: api(small, "alerts")["alerts"])


def test_the_healthcheck_fails_while_the_database_does_not_answer(small):
    def healthcheck():
        return small.compose("exec", "-T", "mlflow", "python3", "/opt/mlflow/entrypoint.py", "healthcheck",
                             check=False)

    assert healthcheck().returncode == 0
    small.compose("stop", "db")
    try:
        result = healthcheck()
        assert result.returncode == 1 and "the database does not answer" in result.stdout, result
    finally:
        small.compose("start", "db")
    wait_for(lambda: healthcheck().returncode == 0, 120, "the healthcheck to pass once the database is back")
