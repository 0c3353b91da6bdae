"""Client side of the backup tests, run as separate processes against MLFLOW_TRACKING_URI.

    python workload.py write PREFIX              log a known workload (experiments PREFIX-*)
    python workload.py snapshot PREFIX OUT.json  everything about those experiments, artifacts hashed
    python workload.py logger EXPERIMENT STOPFILE  keep logging short runs until STOPFILE exists
    python workload.py check-complete EXPERIMENT   every run's artifacts download (none missing)
    python workload.py predict MODEL VERSION       load a registered model version, print predictions
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PROBE = [[0.1, 0.8], [0.8, 0.3], [0.5, 0.5]]


def _model():
    from sklearn.linear_model import LogisticRegression

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]] * 5)
    y = np.array([0, 1, 0, 1] * 5)
    return LogisticRegression().fit(x, y), x


def write(prefix: str) -> None:
    client = MlflowClient()
    rng = np.random.default_rng(7)
    work = Path(tempfile.mkdtemp())
    for e in range(3):
        exp_id = client.create_experiment(f"{prefix}-{e}", tags={"owner": f"team-{e}"})
        for r in range(2):
            run = client.create_run(exp_id, run_name=f"run-{e}-{r}", tags={"seed": str(r)})
            rid = run.info.run_id
            metrics = [Metric("loss", float(rng.random()), 1_700_000_000_000 + s * 1000, s) for s in range(300)]
            metrics += [Metric("acc", float(rng.random()), 1_700_000_000_000 + s * 1000, s) for s in range(300)]
            for i in range(0, len(metrics), 500):
                client.log_batch(rid, metrics=metrics[i:i + 500])
            client.log_batch(rid, params=[Param("lr", str(0.1 * (r + 1))), Param("layers", str(e + 2))],
                             tags=[RunTag("note", f"experiment {e} run {r}")])
            small = work / f"summary-{e}-{r}.json"
            small.write_text(json.dumps({"e": e, "r": r}))
            client.log_artifact(rid, str(small), artifact_path="reports")
            if e == 0 and r == 0:
                big = work / "weights.bin"
                big.write_bytes(rng.bytes(25 << 20))
                client.log_artifact(rid, str(big), artifact_path="checkpoints")
                big.unlink()
            client.set_terminated(rid)
    model, x = _model()
    mlflow.set_experiment(f"{prefix}-0")
    with mlflow.start_run(run_name="model-run"):
        mlflow.sklearn.log_model(model, name="model", input_example=x[:2],
                                 registered_model_name=f"{prefix}-model")


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _artifacts(client: MlflowClient, run_id: str, dest: Path) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(path):
        for item in client.list_artifacts(run_id, path):
            if item.is_dir:
                walk(item.path)
            else:
                local = Path(client.download_artifacts(run_id, item.path, str(dest)))
                out[item.path] = _sha(local)
                local.unlink()

    walk(None)
    return out


def snapshot(prefix: str, out: Path) -> None:
    client = MlflowClient()
    dest = Path(tempfile.mkdtemp())
    experiments = sorted((e for e in client.search_experiments() if e.name.startswith(prefix + "-")),
                         key=lambda e: e.name)
    state = {}
    for exp in experiments:
        runs = {}
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            rid = run.info.run_id
            runs[rid] = {
                "name": run.info.run_name, "status": run.info.status,
                "start": run.info.start_time, "end": run.info.end_time,
                "params": run.data.params, "tags": run.data.tags,
                "metrics": {key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(rid, key))
                            for key in run.data.metrics},
                "artifacts": _artifacts(client, rid, dest),
            }
        state[exp.name] = {"id": exp.experiment_id, "tags": exp.tags, "location": exp.artifact_location,
                           "runs": runs}
    versions = client.search_model_versions(f"name='{prefix}-model'")
    state["models"] = sorted((v.name, v.version, v.run_id, v.status) for v in versions)
    out.write_text(json.dumps(state, indent=1, sort_keys=True))
    print(f"snapshot: {len(experiments)} experiments, "
          f"{sum(len(e['runs']) for k, e in state.items() if k != 'models')} runs")


def logger(experiment: str, stopfile: Path) -> None:
    client = MlflowClient()
    exp_id = client.create_experiment(experiment)
    work = Path(tempfile.mkdtemp())
    n = 0
    while not stopfile.exists():
        run = client.create_run(exp_id, run_name=f"live-{n}")
        note = work / "note.txt"
        note.write_text(f"run {n}\n")
        client.log_artifact(run.info.run_id, str(note))
        client.log_batch(run.info.run_id, metrics=[Metric("x", float(i), int(time.time() * 1000), i) for i in range(50)])
        client.set_terminated(run.info.run_id)
        n += 1
    print(f"logger: {n} runs")


def check_complete(experiment: str) -> None:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"check-complete: there is no experiment {experiment!r}")
    dest = Path(tempfile.mkdtemp())
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    for run in runs:
        if run.info.status == "FINISHED":
            got = _artifacts(client, run.info.run_id, dest)
            assert "note.txt" in got, f"run {run.info.run_name}: artifact missing after restore"
    print(f"check-complete: {len(runs)} runs, every finished run has its artifact")


def predict(name: str, version: str) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    print(json.dumps(model.predict(np.array(PROBE)).tolist()))


def main(argv: list[str]) -> int:
    cmd = argv[1]
    if cmd == "write":
        write(argv[2])
    elif cmd == "snapshot":
        snapshot(argv[2], Path(argv[3]))
    elif cmd == "logger":
        logger(argv[2], Path(argv[3]))
    elif cmd == "check-complete":
        check_complete(argv[2])
    elif cmd == "predict":
        predict(argv[2], argv[3])
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
