"""The deployed stack against a plain `mlflow server`, measured in the same run
(`bench/bench.py --compare`): prints a table with the ratios, asserts nothing.

The plain server is the same MLflow from the stack's own image (the same
pinned packages, so an upstream fix moves both sides), started with
`mlflow server` and its defaults (SQLite, 4 uvicorn workers, proxied
artifacts on local disk, plain HTTP) on a free loopback port. Both sides are
measured alternately, round after round, at 1, 4 and 16 client threads with
MLflow's client: single log_metric calls (requests/s and p50), log_batch of
1000 metrics (metrics/s, and the server containers' CPU per 1000 metrics,
from their cgroups, when readable here); then an artifact up (once) and down (DOWNLOADS
times) through each server, and on the stack's side, right after each of those, the same
bytes with boto3 straight to the stack's S3 port (nginx, TLS): the ceiling of the stack's
own network path. Each such pair (who goes first alternates) gives one ratio; the table's
artifact ratio is the median of those, so both halves of each come from the same moment.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

PLAIN_WORKERS = 4  # mlflow server's default, passed explicitly
# Downloads per artifact and round: one 100 MiB download lasts about 0.4 s, short enough
# for the machine's noise to move a single sample by a third.
DOWNLOADS = 3
RAW = "boto3 to the S3 port"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def plain_server(image: str):
    """`mlflow server` with its defaults, in the stack's image; yields its URI."""
    port, name = free_port(), f"mlflow-bench-plain-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:5000",
                    "-e", "MLFLOW_SERVER_ALLOWED_HOSTS=*", "-w", "/tmp", image,
                    "mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", str(PLAIN_WORKERS)],
                   check=True, capture_output=True, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        import requests

        while True:
            try:
                if requests.get(uri + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run(["docker", "logs", "--tail", "40", name], capture_output=True, text=True)
                raise RuntimeError(f"the plain server did not start:\n{logs.stdout}{logs.stderr}")
            time.sleep(1)
        yield uri, name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


@contextmanager
def target(uri: str, creds: dict[str, str]):
    """MLflow's client pointed at one server (its URI and login) for the block."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for k in keys[1:]:
        os.environ.pop(k, None)
    os.environ.update(creds)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _threads(count: int, fn) -> float:
    """Run fn(index) in count threads at once; wall seconds."""
    pool = [threading.Thread(target=fn, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - started


def log_metric_round(threads: int, calls: int) -> tuple[float, float]:
    """(requests/s, p50 ms) of `calls` single log_metric calls per thread."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment(f"compare-{uuid.uuid4().hex[:10]}")
    runs = [client.create_run(exp).info.run_id for _ in range(threads)]
    latencies: list[float] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        mine = []
        for n in range(calls):
            t = time.perf_counter()
            client.log_metric(runs[i], "m", float(n), step=n)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    seconds = _threads(threads, work)
    return threads * calls / seconds, statistics.median(latencies) * 1000


def container_cpu_seconds(containers: list[str]) -> float | None:
    """CPU time the containers used so far (cgroup v1 or v2), None if unreadable here."""
    if not containers:
        return None
    total = 0.0
    for name in containers:
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", name], capture_output=True, text=True,
                             check=False).stdout.strip()
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage")
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat")
        if cid and v1.exists():
            total += int(v1.read_text()) / 1e9
        elif cid and v2.exists():
            usage = dict(line.split() for line in v2.read_text().splitlines())
            total += int(usage["usage_usec"]) / 1e6
        else:
            return None
    return total


def log_batch_round(threads: int, batches: int) -> float:
    """metrics/s of `batches` log_batch calls of 1000 metrics per thread."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment(f"compare-{uuid.uuid4().hex[:10]}")
    runs = [client.create_run(exp).info.run_id for _ in range(threads)]
    now = int(time.time() * 1000)

    def work(i: int) -> None:
        for b in range(batches):
            client.log_batch(runs[i], metrics=[Metric("b", float(k), now, b * 1000 + k) for k in range(1000)])

    return threads * batches * 1000 / _threads(threads, work)


def _rate(mib: int, transfer) -> float:
    """MiB/s of transfer()."""
    started = time.perf_counter()
    transfer()
    return mib / (time.perf_counter() - started)


def _download_rate(mib: int, fetch) -> float:
    """MiB/s of fetch(dest), dest a fresh directory removed afterwards."""
    dest = Path(tempfile.mkdtemp())
    try:
        return _rate(mib, lambda: fetch(dest))
    finally:
        shutil.rmtree(dest)


class MlflowArtifact:
    """One artifact through a tracking server (MLflow's client, the printed settings)."""

    def __init__(self, blob: Path, mib: int):
        from mlflow.tracking import MlflowClient

        self.blob, self.mib = blob, mib
        client = MlflowClient()
        self.client = client
        self.run_id = client.create_run(client.create_experiment(f"compare-{uuid.uuid4().hex[:10]}")).info.run_id

    def up(self) -> float:
        return _rate(self.mib, lambda: self.client.log_artifact(self.run_id, str(self.blob)))

    def down(self) -> float:
        import mlflow

        return _download_rate(self.mib, lambda dest: mlflow.artifacts.download_artifacts(
            run_id=self.run_id, artifact_path=self.blob.name, dst_path=str(dest)))



class Boto3Object:
    """The same bytes with boto3 straight to the stack's S3 port: the ceiling of its own network path."""

    def __init__(self, blob: Path, mib: int, s3: dict[str, str]):
        import boto3

        self.blob, self.mib, self.bucket = blob, mib, s3["bucket"]
        self.client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3["key"],
                                   aws_secret_access_key=s3["secret"], region_name="us-east-1", verify=s3["ca"])
        self.key = f"bench/{uuid.uuid4().hex}"

    def up(self) -> float:
        return _rate(self.mib, lambda: self.client.upload_file(str(self.blob), self.bucket, self.key))

    def down(self) -> float:
        return _download_rate(self.mib, lambda dest: self.client.download_file(self.bucket, self.key,
                                                                               str(dest / "down.bin")))

    def done(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


def artifact_samples(add, side: str, blob: Path, mib: int, s3: dict[str, str] | None, downloads: int,
                     first_boto3: dict[str, bool]) -> None:
    """One upload and `downloads` downloads of blob through the current tracking server, add()ed
    as side's; with s3 (the stack's side) each paired at once with the same by boto3, the
    pair's ratio added too. first_boto3: whose turn it is, per direction (flipped here)."""
    through = MlflowArtifact(blob, mib)
    raw = Boto3Object(blob, mib, s3) if s3 is not None else None
    try:
        for direction, times in (("up", 1), ("down", downloads)):
            for _ in range(times):
                if raw is None:
                    add(side, f"artifact {mib} MiB {direction}: MiB/s", getattr(through, direction)())
                    continue
                # Who goes first alternates, so that an order effect (the page cache, say)
                # does not always fall on the same half.
                pair = [("artifact", through), (RAW, raw)]
                first_boto3[direction] = not first_boto3[direction]
                rates = {way: getattr(mover, direction)()
                         for way, mover in (pair[::-1] if first_boto3[direction] else pair)}
                for way, rate in rates.items():
                    add(side, f"{way} {mib} MiB {direction}: MiB/s", rate)
                add(side, f"artifact {mib} MiB {direction} / {RAW}, paired", rates["artifact"] / rates[RAW])
    finally:
        if raw is not None:
            raw.done()


def compare(image: str, stack_uri: str, stack_creds: dict[str, str], s3: dict[str, str], rounds: int,
            calls: int, batches: int, artifact_mib: Iterable[int], concurrency=(1, 4, 16),
            stack_containers: list[str] = (), downloads: int = DOWNLOADS) -> list[tuple[str, float, float]]:
    """Rows (measure, plain, stack): medians over the rounds, the two sides alternating.
    Per round and size in artifact_mib (MiB): one upload and `downloads` downloads through each
    server; on the stack's side each is paired at once with the same by boto3 to the S3 port,
    and the pair's ratio is a row of its own ("..., paired")."""
    results: dict[str, dict[str, list[float]]] = {}

    def add(side: str, name: str, value: float) -> None:
        results.setdefault(name, {"plain": [], "stack": []})[side].append(value)

    work = Path(tempfile.mkdtemp())
    first_boto3 = {"up": False, "down": False}  # per direction: each alternates on its own
    try:
        blobs = {}
        for mib in artifact_mib:
            blobs[mib] = work / f"compare-{mib}mib.bin"
            with open(blobs[mib], "wb") as fh:
                for _ in range(mib):
                    fh.write(os.urandom(1 << 20))
        with plain_server(image) as (plain_uri, plain_container):
            sides = {"plain": (plain_uri, {}), "stack": (stack_uri, stack_creds)}
            servers = {"plain": [plain_container], "stack": stack_containers}
            for _ in range(rounds):
                for side, (uri, creds) in sides.items():
                    with target(uri, creds):
                        for n in concurrency:
                            rate, p50 = log_metric_round(n, calls)
                            add(side, f"log_metric, {n} thread{'s' * (n > 1)}: req/s", rate)
                            add(side, f"log_metric, {n} thread{'s' * (n > 1)}: p50 ms", p50)
                        for n in concurrency:
                            before = container_cpu_seconds(servers[side])
                            add(side, f"log_batch 1000, {n} thread{'s' * (n > 1)}: metrics/s",
                                log_batch_round(n, batches))
                            after = container_cpu_seconds(servers[side])
                            if before is not None and after is not None:
                                add(side, f"log_batch 1000, {n} thread{'s' * (n > 1)}: server CPU ms per 1000",
                                    (after - before) * 1000 / (n * batches))
                        for mib, blob in blobs.items():
                            artifact_samples(add, side, blob, mib, s3 if side == "stack" else None, downloads,
                                             first_boto3)
    finally:
        shutil.rmtree(work)
    rows = []
    for name, sides_values in results.items():
        plain = statistics.median(sides_values["plain"]) if sides_values["plain"] else float("nan")
        stack = statistics.median(sides_values["stack"])
        rows.append((name, plain, stack))
    return rows


def table(rows: list[tuple[str, float, float]], artifact_mib: Iterable[int]) -> str:
    """Markdown: each measure with both sides and stack/plain (for p50 and CPU, plain/stack: higher is better);
    the artifact rows also against boto3 on the stack's S3 port: both medians, and the median of the
    paired ratios."""
    by_name = {name: (plain, stack) for name, plain, stack in rows}
    lines = ["| measure | plain server | stack | stack / plain |", "|---|---|---|---|"]
    for name, plain, stack in rows:
        if name.startswith(RAW) or name.endswith("paired"):
            continue
        # Lower is better for latency and CPU: the ratio is then plain / stack.
        ratio = plain / stack if name.endswith(("p50 ms", "per 1000")) else stack / plain
        lines.append(f"| {name} | {plain:,.1f} | {stack:,.1f} | {ratio:.2f} |")
    for mib in artifact_mib:
        for direction in ("up", "down"):
            raw = by_name.get(f"{RAW} {mib} MiB {direction}: MiB/s")
            through = by_name.get(f"artifact {mib} MiB {direction}: MiB/s")
            paired = by_name.get(f"artifact {mib} MiB {direction} / {RAW}, paired")
            if raw and through and paired:
                lines.append(f"| artifact {mib} MiB {direction} through MLflow / boto3 to the S3 port | | "
                             f"{through[1]:,.1f} / {raw[1]:,.1f} | {paired[1]:.2f} |")
    return "\n".join(lines)
