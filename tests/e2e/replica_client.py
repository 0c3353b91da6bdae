"""Clients that keep logging while a server replica is killed (replicas.py).

    python replica_client.py THREADS STOPFILE OUT.json [AFTER]

Each thread creates a run, then logs metric points (PACE a second at most)
(POST runs/log-metric, step 0, 1, 2, ...) and, every fifth step, a small
artifact (PUT to the proxied artifact route), through the stack's nginx with
the printed client settings, until STOPFILE exists and AFTER (0 unless given)
of its requests begun after the thread saw it were answered with a 200 (a
count, not a time, so a slower machine logs as much after an event as a faster
one), or GIVE_UP_SECONDS passed since. Plain `requests` sessions with NO retries: every
answer other than 200 is recorded as the client saw it (MLflow's own client
would hide a 502 by retrying for minutes). OUT.json: per thread the run,
the acknowledged steps and artifacts, and every request's start, end and
outcome (monotonic seconds).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

PACE = 20
# After STOPFILE, a thread that does not get its AFTER answers stops this long after (its
# records then show why).
GIVE_UP_SECONDS = 240


def session() -> requests.Session:
    s = requests.Session()
    s.mount("https://", HTTPAdapter(max_retries=0))
    s.auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    s.verify = os.environ["REQUESTS_CA_BUNDLE"]
    return s


def worker(index: int, stop: Path, after: int, base: str, experiment_id: str, out: dict) -> None:
    s = session()
    run = s.post(f"{base}/api/2.0/mlflow/runs/create", json={"experiment_id": experiment_id,
                                                               "run_name": f"replica-{index}"}, timeout=60)
    run.raise_for_status()
    info = run.json()["run"]["info"]
    artifact_base = info["artifact_uri"].split("mlflow-artifacts:", 1)[1].strip("/")
    mine = out[index] = {"run_id": info["run_id"], "artifact_uri": info["artifact_uri"], "steps": [],
                         "artifacts": [], "requests": []}
    step, last, stop_seen, answered_since = 0, 0.0, None, 0
    while stop_seen is None or (answered_since < after and time.monotonic() < stop_seen + GIVE_UP_SECONDS):
        if stop_seen is None and stop.exists():
            stop_seen = time.monotonic()
        calls = [("metric", "POST", f"{base}/api/2.0/mlflow/runs/log-metric",
                  {"json": {"run_id": info["run_id"], "key": "m", "value": step, "timestamp": 1_700_000_000_000 + step,
                            "step": step}})]
        if step % 5 == 0:
            name = f"a-{step}.txt"
            calls.append(("artifact", "PUT",
                          f"{base}/api/2.0/mlflow-artifacts/artifacts/{artifact_base}/{name}",
                          {"data": f"thread {index} step {step}\n".encode() * 64}))
        for kind, method, url, kw in calls:
            # At most PACE requests a second per thread: a steady load, under nginx's per-login rate limit.
            time.sleep(max(0.0, last + 1 / PACE - time.monotonic()))
            started = last = time.monotonic()
            try:
                status, error = s.request(method, url, timeout=60, **kw).status_code, ""
            except requests.RequestException as exc:
                status, error = 0, f"{type(exc).__name__}: {exc}"
            mine["requests"].append({"kind": kind, "start": started, "end": time.monotonic(), "status": status,
                                     "error": error[:300]})
            if status == 200:
                if stop_seen is not None and started >= stop_seen:
                    answered_since += 1
                if kind == "metric":
                    mine["steps"].append(step)
                else:
                    mine["artifacts"].append(url.rsplit("/", 1)[1])
        step += 1


def main(threads: int, stop: Path, out_path: Path, after: int) -> None:
    base = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    s = session()
    name = f"replicas-{os.getpid()}-{int(time.time())}"
    created = s.post(f"{base}/api/2.0/mlflow/experiments/create", json={"name": name}, timeout=60)
    created.raise_for_status()
    experiment_id = created.json()["experiment_id"]
    out: dict = {}
    pool = [threading.Thread(target=worker, args=(i, stop, after, base, experiment_id, out)) for i in range(threads)]
    for t in pool:
        t.start()
    print(f"started {threads} clients", flush=True)
    for t in pool:
        t.join()
    out_path.write_text(json.dumps(list(out.values())))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
