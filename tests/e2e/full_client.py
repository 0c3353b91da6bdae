"""One run with one artifact of random bytes, for the full-disk test.

    python full_client.py MIB TAG

Prints one JSON line: run_id, artifact_uri, ok, seconds (the log_artifact call
alone) and error (the exception MLflow's client raised, if any).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def main(mib: int, tag: str) -> None:
    mlflow.set_experiment(f"full-disk-{tag}")
    path = Path(tempfile.mkdtemp()) / f"blob-{mib}mib.bin"
    with open(path, "wb") as f:  # random: nothing on the way compresses it
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    with mlflow.start_run() as run:
        started = time.monotonic()
        try:
            mlflow.log_artifact(str(path))
            ok, error = True, ""
        except Exception as exc:  # noqa: BLE001 - the test reads what the user would see
            ok, error = False, f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
    print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri, "ok": ok,
                      "seconds": round(seconds, 2), "error": error}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
