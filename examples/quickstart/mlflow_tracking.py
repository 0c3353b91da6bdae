"""The tutorial's quickstart: one run with a parameter, a metric and artifacts.

It reads everything from the environment and so runs unchanged in every
scenario of docs/tutorial.md:

    MLFLOW_TRACKING_URI      where runs go: ./mlruns, sqlite:///mlruns.db,
                             http://127.0.0.1:PORT, or the stack's URL.
                             Unset, MLflow 3 uses sqlite:///mlflow.db.
    MLFLOW_EXPERIMENT_NAME   the experiment (default: quickstart)
    QUICKSTART_STEPS         how many steps of the metric `foo` (default: 5)

The last line it prints is `run_id=<id>`, so scripts and tests can find the run.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import mlflow

DEFAULT_EXPERIMENT = "quickstart"


def main() -> str:
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    steps = int(os.environ.get("QUICKSTART_STEPS", "5"))
    print(f"Tracking URI:      {mlflow.get_tracking_uri()}")
    print(f"Working directory: {Path.cwd()}")
    print(f"Experiment:        {experiment}")

    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        # A parameter: one value per run.
        param1 = random.randint(0, 100)
        mlflow.log_param("param1", param1)

        # A metric: a value per step, so MLflow keeps its whole history.
        values = []
        for step in range(steps):
            value = round(random.random() + step, 4)
            values.append(value)
            mlflow.log_metric("foo", value, step=step)

        # Artifacts: every file of a folder, uploaded under outputs/.
        # Where they land depends on the scenario (a local folder, S3, the server).
        outputs = Path(tempfile.mkdtemp(prefix="outputs-"))
        try:
            (outputs / "test.txt").write_text("hello world!\n")
            (outputs / "foo.csv").write_text(
                "step,foo\n" + "".join(f"{s},{v}\n" for s, v in enumerate(values)))
            mlflow.log_artifacts(str(outputs), artifact_path="outputs")
        finally:
            shutil.rmtree(outputs)

        print(f"Logged param1={param1}, foo={values}, artifacts outputs/test.txt and outputs/foo.csv")
        print(f"Artifact URI:      {run.info.artifact_uri}")
    print(f"run_id={run.info.run_id}")
    return run.info.run_id


if __name__ == "__main__":
    main()
