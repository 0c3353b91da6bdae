"""MLflow under a path (MLFLOW_BASE_PATH=/mlflow), on its own deployment
(`prefixed_stack`): the printed client settings, a remote client's round trip
(API, proxied artifacts, presigned downloads, a model), the healthcheck, the
redirect into the path, compression, and ./show_all.sh. The security checks
that match paths run on this deployment too (test_security.py, `target`)."""

from __future__ import annotations

import json
import re

from .conftest import BASE_PATH


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
    for outside in ("/", "/api/2.0/mlflow/experiments/search", BASE_PATH):
        response = prefixed_stack.http("GET", outside, auth=False, base=prefixed_stack.origin)
        assert response.status_code == 302, (outside, response.status_code)
        assert response.headers["Location"] == f"{prefixed_stack.origin}{BASE_PATH}/"
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
