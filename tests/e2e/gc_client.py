"""Runs with artifacts for the garbage-collection test, then deletions.

    python gc_client.py OUT.json TAG

Experiment gc-keep-TAG: runs keep, drop-now and drop-later, each with one
artifact; experiment gc-gone-TAG: one run. drop-now and gc-gone are deleted
(soft, as the UI does); drop-later stays active until the test deletes it.
OUT.json maps each name to its run id, experiment id and artifact URI.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def main(out: Path, tag: str) -> None:
    client = MlflowClient()
    work = Path(tempfile.mkdtemp())
    logged = {}
    for experiment, names in ((f"gc-keep-{tag}", ("keep", "drop-now", "drop-later")), (f"gc-gone-{tag}", ("gone",))):
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        for name in names:
            with mlflow.start_run(run_name=name) as run:
                payload = work / f"{name}.txt"
                payload.write_text(f"artifact of {name} {tag}\n" * 1000)
                mlflow.log_artifact(str(payload))
                logged[name] = {"run_id": run.info.run_id, "experiment_id": experiment_id,
                                "artifact_uri": run.info.artifact_uri}
    client.delete_run(logged["drop-now"]["run_id"])
    client.delete_experiment(logged["gone"]["experiment_id"])
    out.write_text(json.dumps(logged))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
