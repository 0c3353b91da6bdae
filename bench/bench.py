"""Benchmarks of a deployed stack, as a client sees it: prints figures, asserts nothing.

    eval "$(./show_all.sh --client-env)" && .venv/bin/python bench/bench.py [--artifact-mib 100]
    ... bench/bench.py --compare [--rounds 3] [--artifact-mib 100,1024]   (see bench_compare.py)

Measures single log_metric calls (requests/s, p50/p95), log_batch of 1000
metrics (metrics/s), and an artifact upload and download through the server
(MiB/s), each the median of three rounds; and the bytes a browser's first load
of the UI transfers (index page plus the scripts and styles it names), without
and with compression. Bounded in count and time; talks only to
MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

# The project's own modules (stack/: .env and the Compose project), for --compare.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_of(rounds: int, fn) -> float:
    return statistics.median(fn() for _ in range(rounds))


def bench(artifact_mib: int) -> dict[str, float]:
    client = MlflowClient()
    exp = client.create_experiment(f"bench-{int(time.time() * 1000)}")
    run_id = client.create_run(exp).info.run_id
    figures: dict[str, float] = {}

    latencies: list[float] = []

    def singles() -> float:
        started = time.perf_counter()
        for i in range(100):
            t = time.perf_counter()
            client.log_metric(run_id, "single", float(i), step=i)
            latencies.append(time.perf_counter() - t)
        return 100 / (time.perf_counter() - started)

    figures["log_metric requests/s"] = _median_of(3, singles)
    latencies.sort()
    figures["log_metric p50 ms"] = latencies[len(latencies) // 2] * 1000
    figures["log_metric p95 ms"] = latencies[int(len(latencies) * 0.95)] * 1000

    def batches() -> float:
        now = int(time.time() * 1000)
        started = time.perf_counter()
        for b in range(5):
            client.log_batch(run_id, metrics=[Metric("batch", float(i), now, b * 1000 + i) for i in range(1000)])
        return 5000 / (time.perf_counter() - started)

    figures["log_batch metrics/s"] = _median_of(3, batches)

    work = Path(tempfile.mkdtemp())
    blob = work / "bench.bin"
    with open(blob, "wb") as fh:
        for _ in range(artifact_mib):
            fh.write(os.urandom(1 << 20))

    def upload() -> float:
        started = time.perf_counter()
        client.log_artifact(run_id, str(blob))
        return artifact_mib / (time.perf_counter() - started)

    def download() -> float:
        dest = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bench.bin", dst_path=str(dest))
        rate = artifact_mib / (time.perf_counter() - started)
        (dest / "bench.bin").unlink()
        return rate

    figures[f"artifact upload MiB/s ({artifact_mib} MiB)"] = _median_of(3, upload)
    figures[f"artifact download MiB/s ({artifact_mib} MiB)"] = _median_of(3, download)
    blob.unlink()
    client.set_terminated(run_id)
    return figures


def ui_first_load_bytes() -> dict[str, float]:
    """Bytes on the wire for the UI's first load, as sent uncompressed and as a
    browser (Accept-Encoding: gzip) receives them."""
    base = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    session = requests.Session()
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        session.auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    index = session.get(base + "/", timeout=60)
    index.raise_for_status()
    assets = sorted(set(re.findall(r'(?:src|href)="([^"]*static-files/[^"]+\.(?:js|css))"', index.text)))
    urls = [base + "/"] + [urllib.parse.urljoin(base + "/", asset) for asset in assets]

    def wire_bytes(encoding: str) -> int:
        total = 0
        for url in urls:
            with session.get(url, headers={"Accept-Encoding": encoding}, stream=True, timeout=120) as r:
                r.raise_for_status()
                total += sum(len(chunk) for chunk in r.raw.stream(1 << 16, decode_content=False))
        return total

    plain, compressed = wire_bytes("identity"), wire_bytes("gzip")
    return {f"UI first load KiB uncompressed ({len(urls)} files)": plain / 1024,
            "UI first load KiB compressed": compressed / 1024,
            "UI first load compression ratio": plain / max(compressed, 1)}


def stack_s3() -> dict[str, str]:
    """The deployed stack's S3 port and credentials (its .env, as the scripts read it)."""
    from stack import compose

    values = compose.values_for_compose()
    host = urllib.parse.urlsplit(os.environ["MLFLOW_TRACKING_URI"]).hostname
    return {"endpoint": f"https://{host}:{values['S3_PORT']}", "key": values["MINIO_ROOT_USER"],
            "secret": values["MINIO_ROOT_PASSWORD"], "bucket": values["MLFLOW_BUCKET"],
            "ca": os.environ.get("REQUESTS_CA_BUNDLE") or True}


def stack_servers() -> list[str]:
    """The stack's MLflow server containers (every replica)."""
    import subprocess

    from stack import paths

    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={paths.project_name()}",
                          "--filter", "label=com.docker.compose.service=mlflow"], capture_output=True, text=True,
                         check=False).stdout
    return out.split()


def run_compare(args) -> int:
    import platform

    import bench_compare

    creds = {k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if k in os.environ}
    print(f"the stack at {os.environ['MLFLOW_TRACKING_URI']} against a plain `mlflow server` ({args.image}, "
          f"{bench_compare.PLAIN_WORKERS} workers, SQLite, HTTP); medians of {args.rounds} alternating rounds "
          f"(artifacts: 1 upload and {bench_compare.DOWNLOADS} downloads per round; on the stack's side each is "
          f"paired with boto3's, and the ratio is the median of the pairs'); "
          f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}", flush=True)
    rows = bench_compare.compare(args.image, os.environ["MLFLOW_TRACKING_URI"], creds, stack_s3(), args.rounds,
                                 args.calls, args.batches, args.artifact_mib, stack_containers=stack_servers())
    print(bench_compare.table(rows, args.artifact_mib))
    return 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: whole numbers of MiB, separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes of at least 1 MiB")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact-mib", default=[100], type=_sizes,
                        help="artifact size in MiB; with --compare, sizes separated by commas (e.g. 100,1024)")
    parser.add_argument("--compare", action="store_true",
                        help="measure a plain `mlflow server` (from --image) in the same run, alternating, "
                             "and print a table with the ratios")
    parser.add_argument("--image", default="mlflow-stack/mlflow:pip", help="the stack's MLflow image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100, help="log_metric calls per thread per round")
    parser.add_argument("--batches", type=int, default=5, help="log_batch calls per thread per round")
    args = parser.parse_args()
    if len(args.artifact_mib) > 1 and not args.compare:
        parser.error("several --artifact-mib sizes need --compare")
    if args.compare:
        # A stopped comparison (kill, a CI timeout) still removes its plain server: SIGTERM
        # becomes SystemExit, so the context managers' clean-up runs as it does on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return run_compare(args)
    print(f"benchmark against {mlflow.get_tracking_uri()} (medians of 3 rounds)")
    for name, value in {**bench(args.artifact_mib[0]), **ui_first_load_bytes()}.items():
        print(f"  {name:<42} {value:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
