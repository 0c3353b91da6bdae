"""A remote team's client, run as its own process with only the printed settings.

    python remote_client.py write OUT.json [--blob-mib N]   log a run, describe it in OUT.json
    python remote_client.py read IN.json                    read it all back and compare

Everything goes through MLFLOW_TRACKING_URI (nginx); nothing here knows about
containers, so what passes here passes for a user on another machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

STEPS = 500


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, mib: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(rng.bytes(1 << 20))


def write(out: Path, blob_mib: int) -> None:
    from sklearn.linear_model import LogisticRegression

    client = MlflowClient()
    experiment = os.environ.get("E2E_EXPERIMENT", "e2e-remote-team")
    mlflow.set_experiment(experiment)
    work = Path(tempfile.mkdtemp())
    with mlflow.start_run(run_name="remote-run") as run:
        run_id = run.info.run_id
        params = {"learning_rate": "0.01", "batch_size": "64", "optimizer": "adam"}
        tags = {"team": "vision", "stage": "e2e"}
        base_ts = 1_700_000_000_000
        losses = [round(1.0 / (step + 1), 6) for step in range(STEPS)]
        metrics = [Metric("loss", v, base_ts + step, step) for step, v in enumerate(losses)]
        for start in range(0, STEPS, 250):
            client.log_batch(run_id, metrics=metrics[start:start + 250])
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        mlflow.log_metric("accuracy", 0.93)

        blob = work / "blob.bin"
        random_file(blob, blob_mib, seed=blob_mib)
        notes = work / "notes.txt"
        notes.write_text("trained on the e2e data set\n")
        mlflow.log_artifact(str(blob), artifact_path="data")
        mlflow.log_artifact(str(notes))

        x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]] * 5)
        y = np.array([0, 1, 0, 1] * 5)
        model = LogisticRegression().fit(x, y)
        info = mlflow.sklearn.log_model(model, name="model", input_example=x[:2])
        probe = [[0.1, 0.8], [0.8, 0.3]]
        predictions = model.predict(np.array(probe)).tolist()

    description = {
        "run_id": run_id,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "params": params,
        "tags": tags,
        "losses": losses,
        "base_ts": base_ts,
        "artifacts": {"data/blob.bin": sha256(blob), "notes.txt": sha256(notes)},
        "blob_bytes": blob.stat().st_size,
        "model_uri": info.model_uri,
        "probe": probe,
        "predictions": predictions,
    }
    out.write_text(json.dumps(description))
    blob.unlink()


def read(inp: Path) -> None:
    want = json.loads(inp.read_text())
    client = MlflowClient()
    run = client.get_run(want["run_id"])
    assert run.data.params == want["params"], run.data.params
    for key, value in want["tags"].items():
        assert run.data.tags.get(key) == value, (key, run.data.tags.get(key))
    history = sorted(client.get_metric_history(want["run_id"], "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(len(want["losses"])))
    assert [m.value for m in history] == want["losses"]
    assert [m.timestamp for m in history] == [want["base_ts"] + s for s in range(len(want["losses"]))]
    assert run.data.metrics["accuracy"] == 0.93

    dest = Path(tempfile.mkdtemp())
    for path, digest in want["artifacts"].items():
        local = mlflow.artifacts.download_artifacts(run_id=want["run_id"], artifact_path=path,
                                                    dst_path=str(dest))
        got = sha256(Path(local))
        assert got == digest, f"{path}: sha256 {got} != {digest}"
        Path(local).unlink()
    model = mlflow.pyfunc.load_model(want["model_uri"])
    predictions = model.predict(np.array(want["probe"])).tolist()
    assert predictions == want["predictions"], predictions
    print(f"read back run {want['run_id']}: params, tags, {len(history)} metric points, "
          f"{len(want['artifacts'])} artifacts (sha256 match) and the model")


def main(argv: list[str]) -> int:
    if argv[1] == "write":
        mib = int(argv[argv.index("--blob-mib") + 1]) if "--blob-mib" in argv else 50
        write(Path(argv[2]), mib)
    elif argv[1] == "read":
        read(Path(argv[2]))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
