"""Two server replicas under clients that log (test_reachable_host.py's default deploy runs two).

The clients (replica_client.py) keep logging metrics and small artifacts, with plain HTTP
sessions that never retry, while one replica's server process is killed with SIGKILL from the
host (a crash: the restart policy brings it back): no metric request gets anything but a 200,
every acknowledged metric point is in PostgreSQL and every acknowledged artifact in the bucket,
the killed replica comes back by itself, and the longest pause a client saw is printed. An
artifact upload whose body was streaming into the killed replica at that instant cannot be
resent by nginx (it no longer holds the body): such a one may get a 502, and only such a one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import assert_acknowledged_stored, server_metrics, show, wait_for
from .test_stack import s3_client

THREADS = 4
AFTER_KILL = 50


def replica_points(stack) -> int:
    """The metric points replica clients logged so far (their runs are named replica-N)."""
    return int(stack.psql("SELECT count(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                          "WHERE m.key = 'm' AND r.name LIKE 'replica-%'"))


def replicas(stack) -> list[dict]:
    rows = []
    for line in stack.compose("ps", "--all", "--format", "json", "mlflow").stdout.splitlines():
        if line.strip():
            parsed = json.loads(line)
            rows.extend(parsed if isinstance(parsed, list) else [parsed])
    return sorted(rows, key=lambda r: r["Name"])


def all_healthy(stack, count: int) -> bool:
    rows = replicas(stack)
    return len(rows) == count and all(r.get("Health") == "healthy" for r in rows)


def served(stack, index: int) -> float:
    """Requests this replica's workers answered (its Prometheus counters)."""
    text = server_metrics(stack, index)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mlflow_http_request_total{"))


def clients_logging(stack, tmp_path, threads: int, after: int, during) -> tuple:
    """replica_client.py's clients (`threads` of them, no retries of their own) log while
    during(client) runs; then each goes on until `after` more of its requests were answered (a
    count: a slow machine is held to what a fast one is), or gives up 240 s after (the records
    then show why). Returns during()'s result and the clients' records."""
    stop, out = tmp_path / "stop", tmp_path / "requests.json"
    client = subprocess.Popen([sys.executable, str(Path(__file__).parent / "replica_client.py"), str(threads),
                               str(stop), str(out), str(after)], env=stack.client_environ(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        result = during(client)
    finally:
        stop.touch()
        try:
            stdout, stderr = client.communicate(timeout=360)
        except subprocess.TimeoutExpired:
            client.kill()
            pytest.fail("the clients did not stop within 360 s")
    assert client.returncode == 0, stderr[-4000:]
    records = json.loads(out.read_text())
    assert len(records) == threads, stdout
    return result, records


def kill_a_replica_while_clients_log(replicated, tmp_path, what: str) -> float:
    """SIGKILL of one of two replicas while clients log, until the restart policy has brought it
    back and each client has AFTER_KILL more answers; asserts that no metric call failed and
    every acknowledged point and artifact is stored; returns the longest pause a client saw."""
    points_before = replica_points(replicated)

    def kill(client):
        wait_for(lambda: client.poll() is not None or replica_points(replicated) >= points_before + THREADS * 20,
                 120, "the clients to log 20 points each", interval=0.5)
        victim = replicas(replicated)[0]
        # A crash, as the host sees it (`docker kill` would count as a manual stop: no restart).
        pid = int(subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", victim["ID"]], check=True,
                                 capture_output=True, text=True).stdout)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # The kill is not one instant: the kernel ends the container's other
        # processes before its first one is reaped. Uploads streaming then may be cut.
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the killed process to be gone", interval=0.01)
        dead_at = time.monotonic()
        # The restart policy brings the killed replica back, while the clients log.
        wait_for(lambda: all_healthy(replicated, 2), 180, "the killed replica to be healthy again", interval=3,
                 detail=lambda: replicas(replicated))
        return killed_at, dead_at

    (killed_at, dead_at), threads = clients_logging(replicated, tmp_path, THREADS, AFTER_KILL, kill)
    calls = [r for t in threads for r in t["requests"]]
    failed = [r for r in calls if r["status"] != 200]
    longest = max(r["end"] - r["start"] for r in calls)
    after_kill = [r for r in calls if r["start"] > dead_at and r["status"] == 200]
    show(f"{what}: {len(calls)} requests from {THREADS} clients, {len(after_kill)} answered after "
         f"the kill, longest pause {longest:.2f} s; failed: "
         f"{[(r['kind'], r['status'], round(r['start'] - killed_at, 2), r['error'][:200]) for r in failed]} "
         f"(the process took {dead_at - killed_at:.3f} s to die)")
    assert not [r for r in failed if r["kind"] == "metric"], \
        [(r["status"], round(r["start"] - killed_at, 3), round(r["end"] - r["start"], 3), r["error"]) for r in failed]
    # Only an upload cut mid-body by the kill itself.
    assert all(r["kind"] == "artifact" and r["status"] == 502 and r["start"] <= dead_at and r["end"] >= killed_at
               for r in failed), [dict(r, start=r["start"] - killed_at, end=r["end"] - killed_at) for r in failed]
    # Each client went on after the replica was back (it gives up after 240 s otherwise).
    assert len(after_kill) >= THREADS * AFTER_KILL, "the clients did not go on logging"
    assert_acknowledged_stored(threads, replicated.psql, s3_client(replicated), replicated.values()["MLFLOW_BUCKET"])
    return longest
