"""Run the three notebooks headless, in order, as a reader would in Jupyter.

    python run_notebooks.py [--workdir DIR] [--save-executed DIR] [--timeout S] [NOTEBOOK ...]

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
        client.execute(env=dict(os.environ if env is None else env))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help="which notebooks to run (default: all three, in order)")
    parser.add_argument("--workdir", type=Path, help="run here (default: a new temporary folder)")
    parser.add_argument("--save-executed", type=Path, metavar="DIR",
                        help="write the executed notebooks, with outputs, into DIR")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)
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
