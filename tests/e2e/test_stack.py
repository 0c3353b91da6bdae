"""End to end: the deployed stack, used from outside as a remote team would.

On the shared deployment: the experiments logged here have names of their own
(EXPERIMENT), and every count checked is either scoped to them or compared with
what PostgreSQL and the bucket hold at that moment, so other modules' data, in
whatever order they ran, changes nothing here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import urllib.parse
import uuid
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from . import gateway
from .conftest import server_metrics, streamed_from_the_store

LONG_RUNNING = ("db", "minio", "mlflow", "nginx")
MiB = 1 << 20
EXPERIMENT = f"stack-e2e-{uuid.uuid4().hex[:8]}"  # this module's experiments: EXPERIMENT[-suffix]


def s3_client(stack):
    """Straight to the bucket through nginx's S3 port (TLS), not through MLflow, at the host
    the printed settings name (localhost for most test stacks)."""
    values = stack.values()
    host = urllib.parse.urlsplit(stack.client_env.get("MLFLOW_TRACKING_URI", "https://localhost")).hostname
    return boto3.client(
        "s3", endpoint_url=f"https://{host}:{values['S3_PORT']}", verify=stack.ca_bundle,
        aws_access_key_id=values["MINIO_ROOT_USER"], aws_secret_access_key=values["MINIO_ROOT_PASSWORD"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"))


def object_sha256(client, bucket, key) -> str:
    digest = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(MiB), b""):
        digest.update(chunk)
    return digest.hexdigest()


def inspect(stack, service):
    cid = stack.container_ids()[service]
    return json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                     check=True).stdout)[0]


def bucket_totals(stack) -> tuple[int, int]:
    """Objects and bytes in the whole bucket, listed straight from S3."""
    client = s3_client(stack)
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.values()["MLFLOW_BUCKET"]):
        for obj in page.get("Contents", []):
            count += 1
            size += obj["Size"]
    return count, size


def nginx_logs_since(stack, since: str) -> str:
    return stack.compose("logs", "--no-color", "--since", since, "nginx").stdout


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="module")
def logged(stack):
    """One remote client process logs a run; its description drives the checks."""
    out = stack.workdir / "run.json"
    stack.client("write", str(out), extra={"E2E_EXPERIMENT": EXPERIMENT})
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def read_back(stack, logged):
    """A second client process reads the run back; returns what nginx logged meanwhile."""
    since = now_rfc3339()
    result = stack.client("read", str(stack.workdir / "run.json"))
    return {"stdout": result.stdout, "nginx": nginx_logs_since(stack, since)}


def test_deploy_printed_client_settings(stack):
    values = stack.values()
    certs = stack.environ["STACK_CERT_DIR"]
    assert stack.client_env == {
        "MLFLOW_TRACKING_URI": f"https://localhost:{values['HTTPS_PORT']}",
        "MLFLOW_TRACKING_USERNAME": values["MLFLOW_ADMIN_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": values["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_TRACKING_SERVER_CERT_PATH": f"{certs}/ca.crt",
        "REQUESTS_CA_BUNDLE": f"{certs}/ca-bundle.pem",
        # Artifact parts to and from the S3 port (docs/performance.md).
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(25 << 20),
        "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(25 << 20),
    }
    assert "Deployed." in stack.deploy_output


def test_every_service_is_healthy(stack):
    out = stack.compose("ps", "-a", "--format", "json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    states = {r["Service"]: (r["State"], r.get("Health"), r.get("ExitCode")) for r in rows}
    for service in LONG_RUNNING:
        assert states[service][:2] == ("running", "healthy"), states
    for job in ("migrate", "bucket-init"):
        assert states[job][0] == "exited" and states[job][2] == 0, states


def test_only_nginx_publishes_and_only_on_loopback(stack):
    for service in LONG_RUNNING:
        bindings = inspect(stack, service)["HostConfig"]["PortBindings"] or {}
        if service == "nginx":
            assert bindings, "nginx publishes nothing"
            for ports in bindings.values():
                assert all(p["HostIp"] == "127.0.0.1" for p in ports), bindings
        else:
            assert not bindings, f"{service} publishes {bindings}"


def test_database_and_object_store_are_on_an_internal_network_only(stack):
    for service in ("db", "minio"):
        networks = inspect(stack, service)["NetworkSettings"]["Networks"]
        assert list(networks) == [f"{stack.project}_backend"], networks
    net = json.loads(subprocess.run(["docker", "network", "inspect", f"{stack.project}_backend"],
                                    capture_output=True, text=True, check=True).stdout)[0]
    assert net["Internal"] is True


def test_health_endpoints_answer_without_login_over_verified_tls(stack):
    health = stack.http("GET", "/health", auth=False)
    assert health.status_code == 200 and health.text.strip() == "OK"
    assert stack.http("GET", "/nginx-health", auth=False).status_code == 200


def test_plain_http_redirects_to_https(stack):
    values = stack.values()
    response = stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1", auth=False,
                          base=f"http://localhost:{values['HTTP_PORT']}")
    assert response.status_code == 301
    assert response.headers["Location"] == \
        f"https://localhost:{values['HTTPS_PORT']}/api/2.0/mlflow/experiments/search?max_results=1"


def test_remote_client_rows_are_in_postgresql(stack, logged):
    run_id = logged["run_id"]
    assert stack.psql(f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' AND key = 'loss'") \
        == str(len(logged["losses"]))
    rows = stack.psql(f"SELECT key, value FROM params WHERE run_uuid = '{run_id}' ORDER BY key")
    assert dict(line.split("|") for line in rows.splitlines()) == logged["params"]
    last = stack.psql(f"SELECT value, step FROM latest_metrics WHERE run_uuid = '{run_id}' AND key = 'loss'")
    assert last == f"{logged['losses'][-1]}|{len(logged['losses']) - 1}"
    assert stack.psql(f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == "FINISHED"
    assert stack.psql(f"SELECT e.name FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
                      f"WHERE r.run_uuid = '{run_id}'") == EXPERIMENT
    assert stack.psql(f"SELECT count(*) FROM runs WHERE experiment_id = {logged['experiment_id']}") == "1"
    assert stack.psql(f"SELECT count(*) FROM logged_models WHERE experiment_id = {logged['experiment_id']} "
                      f"AND source_run_id = '{run_id}'") == "1"


def test_remote_client_artifacts_are_objects_in_the_bucket(stack, logged):
    values = stack.values()
    bucket = values["MLFLOW_BUCKET"]
    prefix = f"artifacts/{logged['experiment_id']}/{logged['run_id']}/artifacts/"
    client = s3_client(stack)
    objects = {o["Key"][len(prefix):]: o["Size"]
               for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert objects.get("data/blob.bin") == logged["blob_bytes"] == 50 * MiB
    for path, digest in logged["artifacts"].items():
        assert object_sha256(client, bucket, prefix + path) == digest
    models = client.list_objects_v2(Bucket=bucket, Prefix=f"artifacts/{logged['experiment_id']}/models/")
    assert any(o["Key"].endswith("MLmodel") for o in models.get("Contents", []))


def test_a_second_client_process_reads_everything_back(read_back):
    assert "sha256 match" in read_back["stdout"]


def test_downloads_are_streamed_by_nginx_from_the_store(stack, logged, read_back):
    """With the printed settings a client asks the server for a file; once the server has
    checked the request, nginx fetches it from the store (X-Accel-Redirect to an internal
    location, a GET the server signed for the internal endpoint) and streams it."""
    path = f"{logged['experiment_id']}/{logged['run_id']}/artifacts/data/blob.bin"
    served = re.findall(rf'"GET /api/2\.0/mlflow-artifacts/artifacts/{re.escape(path)} HTTP/1\.1" 200 (\d+)',
                        read_back["nginx"])
    assert served and int(served[0]) >= logged["blob_bytes"], "the client did not get the file from the HTTPS port"
    assert f" s3 \"GET /{stack.values()['MLFLOW_BUCKET']}/artifacts/{path}\"" not in read_back["nginx"], \
        "the client went to the S3 port"

    digest, size = hashlib.sha256(), 0
    with stack.http("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}", stream=True) as got:
        assert got.status_code == 200, got.text[:300]
        for chunk in got.iter_content(MiB):
            digest.update(chunk)
            size += len(chunk)
        headers = {k.lower(): v for k, v in got.headers.items()}
    assert (size, digest.hexdigest()) == (logged["blob_bytes"], logged["artifacts"]["data/blob.bin"])
    # Fetched from the store (its request id), the server's name for it, and nothing of the fetch's URL.
    assert "x-amz-request-id" in headers and headers["content-disposition"] == "attachment; filename=blob.bin", headers
    assert not any("x-stack" in k or "X-Amz-Signature" in v for k, v in headers.items()), headers
    # Not for clients: only the server's answer leads there.
    assert stack.http("GET", "/_stack/s3-fetch").status_code == 404
    # A file that is not there keeps MLflow's own answer (an error, not nginx's 404 page).
    missing = stack.http("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}.missing")
    assert missing.status_code >= 400 and "error_code" in missing.text, missing.text[:300]
    logs = stack.compose("logs", "--no-color", "nginx").stdout
    assert "X-Amz-Signature" not in logs, "presigned signatures must not be logged"
    # The 50 MiB upload went to the S3 port in presigned parts (25 MiB and more, printed settings).
    parts = re.findall(rf' s3 "PUT /{stack.values()["MLFLOW_BUCKET"]}/artifacts/{re.escape(path)}" 200 ', logs)
    assert len(parts) == 2, parts


def test_nginx_fetches_names_that_need_escaping_and_byte_ranges(stack, logged):
    """The server signs the name in the store's own escaped form (UTF-8, space, + = % ~),
    and a client's Range reaches the store: a broken download resumes where it stopped."""
    name = "naïve résumé 1+1=2 100% ~draft.bin"
    path = f"{logged['experiment_id']}/{logged['run_id']}/artifacts/names/{name}"
    url = "/api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(path)
    body = os.urandom(3 * MiB + 17)
    put = stack.http("PUT", url, data=body)
    assert put.status_code == 200, put.text[:300]
    listed = stack.http("GET", "/api/2.0/mlflow-artifacts/artifacts",
                        params={"path": path.rsplit("/", 1)[0]}).json()
    assert {f["path"]: int(f["file_size"]) for f in listed["files"]} == {name: len(body)}, listed
    whole = stack.http("GET", url)
    assert whole.status_code == 200 and whole.content == body, (whole.status_code, whole.text[:300])
    assert streamed_from_the_store(whole), "MLflow answered, not nginx from the store"
    rest = stack.http("GET", url, headers={"Range": f"bytes={MiB}-"})
    assert rest.status_code == 206 and rest.content == body[MiB:], (rest.status_code, len(rest.content))
    assert rest.headers["Content-Range"] == f"bytes {MiB}-{len(body) - 1}/{len(body)}"

def test_a_gzip_file_downloads_as_the_bytes_that_were_logged(stack, logged):
    """MLflow stores a .gz file with Content-Encoding gzip (guessed from its name); nginx's
    fetch must not pass that on, or MLflow's client (requests) saves the unpacked bytes."""
    name = "table.csv.gz"
    path = f"{logged['experiment_id']}/{logged['run_id']}/artifacts/gz/{name}"
    body = gzip.compress(b"step,loss\n" + os.urandom(256 * 1024))
    url = "/api/2.0/mlflow-artifacts/artifacts/" + path
    assert stack.http("PUT", url, data=body).status_code == 200
    stored = s3_client(stack).head_object(Bucket=stack.values()["MLFLOW_BUCKET"], Key=f"artifacts/{path}")
    assert stored.get("ContentEncoding") == "gzip", stored  # what would be passed on
    got = stack.http("GET", url)
    assert got.status_code == 200 and streamed_from_the_store(got), got.headers
    assert "content-encoding" not in {k.lower() for k in got.headers}, got.headers
    assert got.content == body

def test_the_server_writes_metrics_through_the_stacks_tracking_store(stack, logged):
    """MLflow finds mlflow/stack_store.py for postgresql:// URIs (its entry point), and the
    remote client's metrics (test_remote_client_rows_are_in_postgresql) went through it."""
    code = ("from stack import common; from mlflow.tracking._tracking_service.utils import "
            "_tracking_store_registry as r; print(type(r.get_store(common.database_uri(), 's3://b/a')).__name__)")
    out = stack.compose("exec", "-T", "mlflow", "python3", "-c", code).stdout.strip().splitlines()
    assert out[-1] == "StackSqlStore", out


def test_the_stacks_tracking_store_leaves_what_mlflows_own_leaves_on_postgresql(stack):
    """tests/e2e/store_check.py in the server's container, on the stack's database."""
    script = (Path(__file__).parent / "store_check.py").read_text()
    out = stack.compose("exec", "-T", "mlflow", "python3", "-", stdin=script).stdout.strip().splitlines()
    result = json.loads(out[-1])
    assert result["errors"] == [], result
    assert result["same"] and result["points"] > 500, result
    assert result["concurrent_same"], result
    assert result["ways"]["copy"] >= 10 and result["ways"]["mlflow"] >= 10, result
    # Both searches agreed on every page (store_check raises otherwise), and found runs.
    assert len(result["searches"]) == 8 and all(runs > 0 for _, runs in result["searches"].values()), result


def test_secrets_are_not_in_inspect_top_or_logs(stack, logged):
    values = stack.values()
    secrets = [values[k] for k in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                                   "MLFLOW_FLASK_SECRET_KEY", "MLFLOW_CRYPTO_KEK_PASSPHRASE")]
    ids = list(stack.container_ids().values())
    inspected = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout
    logs = stack.compose("logs", "--no-color").stdout
    tops = "".join(subprocess.run(["docker", "top", i, "-eo", "pid,args"], capture_output=True, text=True,
                                  check=False).stdout for i in ids)
    for secret in secrets:
        assert secret not in inspected
        assert secret not in logs
        assert secret not in tops


def test_gateway_secrets_are_stored_under_this_installations_key(stack):
    """MLflow's AI gateway encrypts the provider keys it stores; with the stack's
    generated MLFLOW_CRYPTO_KEK_PASSPHRASE, not MLflow's built-in one."""
    gateway.create(stack, "e2e-openai", "sk-e2e-stack-0123456789")
    assert gateway.read_back(stack, "e2e-openai") == {"value": {"api_key": "sk-e2e-stack-0123456789"},
                                                      "builtin_key": "refused"}
    assert "sk-e2e-stack-0123456789" not in stack.compose("logs", "--no-color").stdout



def _requests_counted(stack) -> float:
    """mlflow_http_request_total summed over labels, from the server's internal metrics port."""
    text = server_metrics(stack)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mlflow_http_request_total{"))


def test_server_metrics_count_requests_inside_and_are_not_served_outside(stack):
    before = _requests_counted(stack)
    for _ in range(5):
        assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200
    assert _requests_counted(stack) >= before + 5
    assert stack.http("GET", "/metrics").status_code == 404
    # Nor the object store's own metrics and health API, on the published S3 port.
    s3 = f"https://localhost:{stack.values()['S3_PORT']}"
    for path in ("/minio/v2/metrics/cluster", "/minio/health/live"):
        assert stack.http("GET", path, auth=False, base=s3).status_code == 404, path


def test_a_localhost_deploy_says_it_works_on_this_machine_only(stack):
    assert "MLFLOW_PUBLIC_HOST=localhost is this machine's loopback" in stack.deploy_output


def test_redeploy_of_a_running_stack_changes_nothing(stack, logged):
    before_ids = stack.container_ids()
    started = {s: inspect(stack, s)["State"]["StartedAt"] for s in LONG_RUNNING}
    env_before = stack.env_file.read_bytes()
    runs_before = stack.psql("SELECT count(*) FROM runs")
    # No copy of .env and the CA off the machine yet: said. A kit made, the next deploy is quiet.
    assert "WARNING: no copy of .env and the local CA's key" in stack.deploy_output
    kit = stack.workdir / "recovery-kit"
    made = stack.script("show_all.sh", "--recovery-kit", str(kit))
    assert (kit / "env").read_bytes() == env_before and (kit / "certs" / "ca.key").exists(), made.stdout
    assert "recovery kit   made" in stack.script("show_all.sh").stdout
    stack.deploy()
    assert "no copy of .env" not in stack.deploy_output
    # The admin's password: printed by the first deploy only (and on request).
    assert stack.values()["MLFLOW_ADMIN_PASSWORD"] not in stack.deploy_output
    assert "./show_all.sh --client-env prints it" in stack.deploy_output
    assert stack.env_file.read_bytes() == env_before
    after_ids = stack.container_ids()
    for service in LONG_RUNNING:
        assert after_ids[service] == before_ids[service], f"{service} was recreated"
        assert inspect(stack, service)["State"]["StartedAt"] == started[service], f"{service} restarted"
    assert stack.psql("SELECT count(*) FROM runs") == runs_before


def test_remove_and_deploy_again_keeps_everything(stack, logged):
    stack.script("stack_remove.sh")
    assert stack.container_ids() == {}
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                              f"label=com.docker.compose.project={stack.project}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(volumes) == [f"{stack.project}_{v}" for v in ("db-data", "minio-data", "mlflow-tmp")], volumes
    stack.deploy()
    stack.client("read", str(stack.workdir / "run.json"))


def test_show_all_reports_state_counts_and_client_env(stack, logged):
    out = stack.script("show_all.sh").stdout
    for service in LONG_RUNNING:
        assert re.search(rf"^\s+{service}\s+running\s+health=healthy", out, re.M), out
    # Nothing else logs while it runs: its counts are what PostgreSQL and the bucket hold,
    # including this module's run and its 50 MiB artifact.
    experiments, runs, models = stack.psql(
        "SELECT (SELECT count(*) FROM experiments WHERE lifecycle_stage = 'active'), "
        "(SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'), "
        "(SELECT count(*) FROM registered_models)").split("|")
    assert int(experiments) >= 2 and int(runs) >= 1  # Default and this module's experiment, its run
    assert re.search(rf"experiments\s+{experiments} active$", out, re.M), (experiments, out)
    assert re.search(rf"runs\s+{runs} active$", out, re.M), (runs, out)
    assert re.search(rf"models\s+{models} registered$", out, re.M), (models, out)
    count, size = bucket_totals(stack)
    assert size >= 50 * MiB
    shown = re.search(rf"bucket\s+{count} objects, (\d+\.\d) (MiB|GiB)$", out, re.M)
    assert shown, (count, size, out)
    unit = MiB if shown.group(2) == "MiB" else 1024 * MiB
    assert abs(float(shown.group(1)) - size / unit) <= 0.05, (shown.group(0), size)
    assert re.search(r"version\s+3\.\d+\.\d+", out), out
    from .conftest import parse_exports

    env = stack.script("show_all.sh", "--client-env").stdout
    assert parse_exports(env) == stack.client_env


def test_a_large_artifact_round_trips_in_whole_parts_without_413_or_504(stack):
    """MLflow's client sends it in parts through the S3 port (the printed settings' 25 MiB):
    13 of them. (A 1 GiB one streams through nginx and the server in test_base_path.py.)"""
    out = stack.workdir / "big.json"
    since = now_rfc3339()  # other modules' requests (e.g. an oversized body, 413) are not this upload's
    stack.client("write", str(out), "--blob-mib", "320", extra={"E2E_EXPERIMENT": f"{EXPERIMENT}-big"})
    stack.client("read", str(out))
    logs = nginx_logs_since(stack, since)
    assert json.loads(out.read_text())["run_id"] in logs, "the upload did not go through nginx"
    assert not re.search(r'" (413|502|504) ', logs)


def test_direct_mode_clients_write_to_s3_themselves(stack):
    stack.deploy(extra={"MLFLOW_ARTIFACTS_MODE": "direct"})
    try:
        env = stack.client_env
        assert env["MLFLOW_S3_ENDPOINT_URL"] == f"https://localhost:{stack.values()['S3_PORT']}"
        assert env["AWS_CA_BUNDLE"] == stack.ca_bundle
        assert env["AWS_SECRET_ACCESS_KEY"] == stack.values()["MINIO_ROOT_PASSWORD"]
        out = stack.workdir / "direct.json"
        stack.client("write", str(out), "--blob-mib", "5", extra={"E2E_EXPERIMENT": f"{EXPERIMENT}-direct"})
        logged = json.loads(out.read_text())
        assert logged["artifact_uri"].startswith(f"s3://{stack.values()['MLFLOW_BUCKET']}/artifacts/")
        stack.client("read", str(out))
    finally:
        stack.deploy()
    assert "MLFLOW_S3_ENDPOINT_URL" not in stack.client_env
