"""MLflow under a path (MLFLOW_BASE_PATH=/mlflow), on its own deployment
(`prefixed_stack`): the printed client settings, a remote client's round trip
(API, proxied artifacts, presigned downloads, a model), the healthcheck, the
redirect into the path, compression, and ./show_all.sh. The security checks
that match paths run on this deployment too (test_security.py, `target`)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading

from .conftest import BASE_PATH, streamed_from_the_store
from .test_stack import object_sha256, s3_client

MiB = 1 << 20


def test_client_settings_end_with_the_path(prefixed_stack):
    port = prefixed_stack.values()["HTTPS_PORT"]
    assert prefixed_stack.client_env["MLFLOW_TRACKING_URI"] == f"https://localhost:{port}{BASE_PATH}"


def test_remote_client_round_trip_under_the_path(prefixed_stack):
    out = prefixed_stack.workdir / "prefixed-run.json"
    prefixed_stack.client("write", str(out), "--blob-mib", "8", extra={"E2E_EXPERIMENT": "under-a-path"})
    logged = json.loads(out.read_text())
    read = prefixed_stack.client("read", str(out))
    assert "sha256 match" in read.stdout
    # The rows are where the client says they are.
    assert prefixed_stack.psql(f"SELECT count(*) FROM metrics WHERE run_uuid = '{logged['run_id']}' "
                               "AND key = 'loss'") == str(len(logged["losses"]))
    assert logged["artifact_uri"].startswith("mlflow-artifacts:/")


def test_health_is_under_the_path_and_other_paths_lead_into_it(prefixed_stack):
    health = prefixed_stack.http("GET", "/health", auth=False)
    assert health.status_code == 200 and health.text.strip() == "OK"
    for outside, into in (("/", f"{BASE_PATH}/"), (BASE_PATH, f"{BASE_PATH}/"), (f"{BASE_PATH}?x=1", f"{BASE_PATH}/?x=1"),
                          ("/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                           f"{BASE_PATH}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")):
        response = prefixed_stack.http("GET", outside, auth=False, base=prefixed_stack.origin)
        assert (response.status_code, response.headers.get("Location")) == (308, into), outside
    # A client that left the path out of MLFLOW_TRACKING_URI still writes: 308 keeps the method and body.
    created = prefixed_stack.http("POST", "/api/2.0/mlflow/experiments/create", base=prefixed_stack.origin,
                                  json={"name": "created-without-the-path"}, allow_redirects=True)
    assert created.status_code == 200, created.text
    assert prefixed_stack.psql("SELECT count(*) FROM experiments WHERE name = 'created-without-the-path'") == "1"
    # An upload above the API body limit is redirected too (not refused by the limit first).
    big = b"0123456789abcdef" * (70 << 16)  # 70 MiB > MLFLOW_API_MAX_BODY_MB
    put = prefixed_stack.http("PUT", "/api/2.0/mlflow-artifacts/artifacts/redirected/big.bin", data=big,
                              base=prefixed_stack.origin, allow_redirects=True, timeout=300)
    assert put.status_code == 200, (put.status_code, put.text[:300])
    assert [r.status_code for r in put.history] == [308]
    key = "artifacts/redirected/big.bin"
    assert object_sha256(s3_client(prefixed_stack), prefixed_stack.values()["MLFLOW_BUCKET"], key) == \
        hashlib.sha256(big).hexdigest()
    # The server's own healthcheck (in the image) follows the path: the service is healthy.
    rows = [json.loads(line) for line in prefixed_stack.compose("ps", "--format", "json").stdout.splitlines() if line]
    assert {r["Service"]: r.get("Health") for r in rows}["mlflow"] == "healthy"


def test_ui_is_served_compressed_and_its_hashed_files_are_cacheable(prefixed_stack):
    page = prefixed_stack.http("GET", "/", headers={"Accept-Encoding": "gzip"})
    assert page.status_code == 200  # under 1 KiB: sent as it is (gzip_min_length)
    script = re.search(r'src="([^"]*static-files/[^"]+\.js)"', page.text).group(1)
    path = script[len(BASE_PATH):] if script.startswith(BASE_PATH) else "/" + script.lstrip("/")
    asset = prefixed_stack.http("GET", path, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert asset.status_code == 200 and asset.headers.get("Content-Encoding") == "gzip"
    max_age = int(re.search(r"max-age=(\d+)", asset.headers["Cache-Control"]).group(1))
    assert max_age >= 7 * 24 * 3600, asset.headers["Cache-Control"]
    api = prefixed_stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1")
    assert "max-age" not in api.headers.get("Cache-Control", ""), api.headers


def test_show_all_prints_the_url_with_the_path(prefixed_stack):
    result = prefixed_stack.script("show_all.sh")
    port = prefixed_stack.values()["HTTPS_PORT"]
    assert f"https://localhost:{port}{BASE_PATH}" in result.stdout


def _memory_mib(container: str) -> float:
    usage = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", container],
                           capture_output=True, text=True, check=True).stdout.split("/")[0].strip()
    number, unit = re.match(r"([\d.]+)\s*([KMG]i?B|B)", usage).groups()
    return float(number) * {"B": 1 / MiB, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def test_a_1_gib_artifact_streams_through_the_path(prefixed_stack):
    """MLflow mounts its streaming artifact route at the root even under
    --static-prefix; its prefixed twin (Flask) holds the whole upload in memory.
    The input guard hands prefixed artifact GET/PUT to the streaming route: its
    answer to a PUT is an empty 200 (Flask's is a JSON body). What the bucket
    then holds, and what a client reads back, is the file byte for byte."""
    experiment = prefixed_stack.http("POST", "/api/2.0/mlflow/experiments/create",
                                      json={"name": "one-gib-under-a-path"}).json()["experiment_id"]
    path = f"{experiment}/streamed/big.bin"
    block, blocks = hashlib.sha512(b"seed").digest() * (MiB // 64), 1024
    sent = hashlib.sha256()

    def body():
        for i in range(blocks):
            chunk = i.to_bytes(8, "big") + block[8:]
            sent.update(chunk)
            yield chunk

    mlflow_container = prefixed_stack.container_ids()["mlflow"]
    idle, peak, done = _memory_mib(mlflow_container), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _memory_mib(mlflow_container))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        put = prefixed_stack.http("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{path}", data=body(), timeout=900)
    finally:
        done.set()
        sampler.join()
    print(f"1 GiB PUT under {BASE_PATH}: mlflow container memory {idle:.0f} MiB idle, {peak[0]:.0f} MiB peak")
    assert (put.status_code, put.content) == (200, b""), (put.status_code, put.text[:300])

    values = prefixed_stack.values()
    key = f"artifacts/{path}"
    assert object_sha256(s3_client(prefixed_stack), values["MLFLOW_BUCKET"], key) == sent.hexdigest()
    got, size = hashlib.sha256(), 0
    with prefixed_stack.http("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}", stream=True, timeout=900) as read:
        assert read.status_code == 200
        # Streamed by nginx from the store (the store's request id), under the prefix too.
        assert streamed_from_the_store(read), read.headers
        for chunk in read.iter_content(MiB):
            got.update(chunk)
            size += len(chunk)
    assert (size, got.hexdigest()) == (blocks * MiB, sent.hexdigest())
