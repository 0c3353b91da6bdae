"""The data the browser test looks at, logged by a client in its own process.

    python browser_client.py OUT.json TAG

One experiment, one run with a `loss` history, a text artifact and a registered
model version, all named after TAG; OUT.json describes them. Like
remote_client.py, it only knows the printed client settings (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LogisticRegression

STEPS = 20


def main(out: Path, tag: str) -> None:
    client = MlflowClient()
    experiment_name = f"browser-{tag}"
    run_name = f"browser-run-{tag}"
    model_name = f"browser-model-{tag}"
    sentence = f"The browser test wrote this note, token {tag}."
    experiment_id = mlflow.set_experiment(experiment_name).experiment_id
    work = Path(tempfile.mkdtemp())
    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
        base_ts = 1_700_000_000_000
        client.log_batch(run_id, metrics=[Metric("loss", round(1.0 / (step + 1), 6), base_ts + step * 1000, step)
                                          for step in range(STEPS)])
        mlflow.log_param("optimizer", "adam")
        notes = work / "notes.txt"
        notes.write_text(sentence + "\n")
        mlflow.log_artifact(str(notes))
        x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]] * 5)
        model = LogisticRegression().fit(x, np.array([0, 1, 0, 1] * 5))
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=model_name)
    out.write_text(json.dumps({
        "experiment_name": experiment_name, "experiment_id": experiment_id, "run_name": run_name,
        "run_id": run_id, "model_name": model_name, "model_version": info.registered_model_version,
        "sentence": sentence, "steps": STEPS,
    }))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
