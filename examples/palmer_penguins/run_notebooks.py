"""Run the three notebooks headless, in order, as a reader would in Jupyter.

    python run_notebooks.py [--workdir DIR] [--save-executed DIR] [--timeout S] [NOTEBOOK ...]
    python run_notebooks.py --summary     what the notebooks left in the store, as JSON

Needs nbclient and ipykernel (pip install nbclient ipykernel). Settings come
from the environment, as for the notebooks themselves: MLFLOW_TRACKING_URI,
PENGUINS_EXPERIMENT, PENGUINS_MODEL_NAME.

The notebooks and data/ are copied into a working folder (--workdir, default a
new temporary one) and run there, so whatever a notebook writes next to itself
(with no MLFLOW_TRACKING_URI: mlflow.db and mlruns/) stays out of the source
tree. The stored notebooks keep no outputs; --save-executed DIR writes the
executed copies, with outputs, into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = [
    "1_Run_and_track_experiments.ipynb",
    "2_Deploy_and_manage.ipynb",
    "3_Tips_and_tricks.ipynb",
]


def prepare_workdir(workdir: Path) -> Path:
    """Copy the notebooks and their data into WORKDIR (created if missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        shutil.copy2(HERE / name, workdir / name)
    shutil.copytree(HERE / "data", workdir / "data", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def run_notebook(path: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """Execute PATH in its own folder with a fresh python3 kernel; return (notebook, seconds).

    A failing cell raises nbclient's CellExecutionError, which names the cell
    and carries the traceback.
    """
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    notebook = nbformat.read(path, as_version=4)
    # IPC sockets in a private folder: no TCP port is opened for the kernel.
    runtime = Path(tempfile.mkdtemp(prefix="nbkernel-"))
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(runtime / "kernel")
    client = NotebookClient(notebook, config=config, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    started = time.monotonic()
    try:
        kernel_env = dict(os.environ if env is None else env)
        kernel_env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        client.execute(env=kernel_env)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    return notebook, time.monotonic() - started


def run_all(workdir: Path, env: dict[str, str] | None = None, names: list[str] | None = None,
            save_dir: Path | None = None, timeout: int = 600) -> dict[str, float]:
    """Run NAMES (default: all three, in order) in WORKDIR; return seconds per notebook."""
    import nbformat

    prepare_workdir(workdir)
    timings = {}
    for name in names or NOTEBOOKS:
        notebook, seconds = run_notebook(workdir / name, env=env, timeout=timeout)
        timings[name] = seconds
        print(f"{name}: ran in {seconds:.1f} s", flush=True)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, save_dir / name)
    return timings


def summarize(experiment: str | None = None, model_name: str | None = None) -> dict:
    """What the notebooks left in the tracking store (MLFLOW_TRACKING_URI), as plain data:
    both experiments with every run (deleted ones too), and the registered model."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    experiment = experiment or os.environ.get("PENGUINS_EXPERIMENT", "palmer-penguins")
    model_name = model_name or os.environ.get("PENGUINS_MODEL_NAME", "penguins-classifier")
    client = MlflowClient()

    def describe_model(uri: str) -> dict:
        info = get_model_info(uri)
        inputs = info.signature.inputs.input_names() if info.signature else []
        return {"uri": uri, "flavors": sorted(info.flavors), "signature_inputs": inputs,
                "input_example": info.saved_input_example_info is not None}

    def artifact_paths(run_id: str, path: str | None = None) -> list[str]:
        found = []
        for info in client.list_artifacts(run_id, path):
            found += artifact_paths(run_id, info.path) if info.is_dir else [info.path]
        return found

    summary: dict = {"tracking_uri": client.tracking_uri, "experiments": {}, "registered_model": None}
    for name in (experiment, f"{experiment}-tips"):
        found = client.get_experiment_by_name(name)
        if found is None:
            continue
        runs = []
        for run in client.search_runs([found.experiment_id], run_view_type=ViewType.ALL,
                                      order_by=["attributes.start_time ASC"], max_results=1000):
            models = client.search_logged_models(
                experiment_ids=[found.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'")
            runs.append({
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "lifecycle_stage": run.info.lifecycle_stage,
                "params": run.data.params,
                "metrics": run.data.metrics,
                "tags": run.data.tags,
                "datasets": [d.dataset.name for d in run.inputs.dataset_inputs],
                "artifacts": artifact_paths(run.info.run_id),
                "models": [describe_model(m.model_uri) for m in models],
            })
        summary["experiments"][name] = {"id": found.experiment_id, "tags": found.tags, "runs": runs}
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException:
        registered = None
    if registered is not None:
        versions = client.search_model_versions(f"name = '{model_name}'")
        summary["registered_model"] = {
            "name": registered.name,
            "description": registered.description,
            "aliases": {alias: str(version) for alias, version in registered.aliases.items()},
            "versions": sorted(({"version": str(v.version), "source": v.source, "run_id": v.run_id,
                                 "tags": v.tags, "description": v.description} for v in versions),
                               key=lambda v: int(v["version"])),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help="which notebooks to run (default: all three, in order)")
    parser.add_argument("--workdir", type=Path, help="run here (default: a new temporary folder)")
    parser.add_argument("--save-executed", type=Path, metavar="DIR",
                        help="write the executed notebooks, with outputs, into DIR")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--summary", action="store_true",
                        help="run nothing; print what the notebooks left in the store as JSON")
    args = parser.parse_args(argv)
    if args.summary:
        print(json.dumps(summarize(), indent=1, sort_keys=True))
        return 0
    unknown = [n for n in args.notebooks if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook {unknown[0]!r}: choose from {', '.join(NOTEBOOKS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="penguins-notebooks-"))
    print(f"tracking URI: {os.environ.get('MLFLOW_TRACKING_URI', '(unset: sqlite:///mlflow.db in the work folder)')}")
    print(f"work folder:  {workdir}")
    try:
        run_all(workdir, names=args.notebooks or None, save_dir=args.save_executed,
                timeout=args.timeout)
    except Exception as exc:  # nbclient's error already holds the cell and traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
