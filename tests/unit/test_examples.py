"""The tutorial's examples, without Docker: the quickstart through examples/scenarios.sh
in scenarios 1, 2, 3a and 3b, and the three notebooks against a local SQLite store.

Every check reads back what was logged, in a separate process, through the same
store (MlflowClient), rather than trusting an exit status.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import paths

pytestmark = pytest.mark.slow

ROOT = paths.ROOT
EXAMPLES = ROOT / "examples"
SCENARIOS = EXAMPLES / "scenarios.sh"
TOOLS = EXAMPLES / "_scenario_tools.py"
PENGUINS = EXAMPLES / "palmer_penguins"
RUNNER = PENGUINS / "run_notebooks.py"
NOTEBOOKS = ["1_Run_and_track_experiments.ipynb", "2_Deploy_and_manage.ipynb", "3_Tips_and_tricks.ipynb"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any MLflow/S3/stack setting, plus EXTRA."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "STACK_", "COMPOSE_", "PENGUINS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def scenario(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([str(SCENARIOS), *args], capture_output=True, text=True,
                            env=env or clean_env(), stdin=subprocess.DEVNULL, timeout=timeout,
                            check=False)
    print(f"scenarios.sh {' '.join(args)}: exit {result.returncode} in {time.monotonic() - started:.1f} s")
    return result


def read_run(run_id: str, tracking_uri: str, cwd: Path, **extra: str) -> dict:
    """The run as a second process sees it (params, metric histories, artifact contents)."""
    result = subprocess.run([sys.executable, str(TOOLS), "run-json", run_id], capture_output=True,
                            text=True, cwd=cwd, timeout=120, check=False,
                            env=clean_env(MLFLOW_TRACKING_URI=tracking_uri, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def quickstart_logged(stdout: str) -> tuple[str, str, list[float]]:
    """run_id, param1 and the foo values the quickstart says it logged."""
    run_id = re.findall(r"^run_id=([0-9a-f]{32})$", stdout, re.M)
    logged = re.search(r"Logged param1=(\d+), foo=(\[[^\]]*\])", stdout)
    assert run_id and logged, stdout
    return run_id[-1], logged.group(1), ast.literal_eval(logged.group(2))


def assert_quickstart_run(run: dict, param1: str, foo: list[float]) -> None:
    assert run["status"] == "FINISHED"
    assert run["experiment"]["name"] == "quickstart"
    assert run["params"] == {"param1": param1}
    assert run["metrics"]["foo"] == [[step, value] for step, value in enumerate(foo)]
    assert sorted(run["artifacts"]) == ["outputs/foo.csv", "outputs/test.txt"]
    assert run["artifacts"]["outputs/test.txt"]["text"] == "hello world!\n"
    rows = run["artifacts"]["outputs/foo.csv"]["text"].splitlines()
    assert rows[0] == "step,foo"
    assert [float(r.split(",")[1]) for r in rows[1:]] == foo


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- examples/scenarios.sh: usage and errors --------------------------------------------------

def test_scenarios_help_and_bad_arguments(tmp_path):
    assert "Usage: examples/scenarios.sh SCENARIO" in scenario("--help").stdout
    bad = scenario("5")
    assert bad.returncode == 2 and "unknown scenario: 5" in bad.stderr
    bad = scenario("1", "--frobnicate")
    assert bad.returncode == 2 and "unknown option: --frobnicate" in bad.stderr
    none = scenario()
    assert none.returncode == 2 and "name a scenario" in none.stderr
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "file").write_text("x")
    busy = scenario("2", "--workdir", str(tmp_path / "old"))
    assert busy.returncode != 0 and "is not empty" in busy.stderr


def test_stack_scenario_without_a_deployed_stack_says_what_to_do(tmp_path):
    missing = scenario("stack", env=clean_env(STACK_ENV_FILE=str(tmp_path / "no.env")))
    assert missing.returncode != 0
    assert "the stack is not deployed" in missing.stderr and "./stack_deploy.sh" in missing.stderr

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    down = scenario("stack", env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed}"))
    assert down.returncode != 0
    assert f"no MLflow server answers at http://127.0.0.1:{closed}/health" in down.stderr
    assert "Traceback" not in down.stderr


# --- the quickstart in scenarios 1, 2, 3a, 3b ---------------------------------------------------

def test_scenario_1_local_file_store(tmp_path):
    work = tmp_path / "s1"
    result = scenario("1", "--workdir", str(work))
    assert result.returncode == 0, result.stderr[-4000:]
    run_id, param1, foo = quickstart_logged(result.stdout + result.stderr)
    # The file store: entities and artifacts side by side under ./mlruns.
    run_dirs = list(work.glob(f"mlruns/*/{run_id}"))
    assert len(run_dirs) == 1, sorted(p.relative_to(work) for p in work.rglob("*"))
    run_dir = run_dirs[0]
    assert (run_dir / "params" / "param1").read_text() == param1
    assert (run_dir / "artifacts" / "outputs" / "test.txt").read_text() == "hello world!\n"
    assert not (work / "mlruns.db").exists()
    assert "MLFLOW_ALLOW_FILE_STORE=true" in result.stderr
    run = read_run(run_id, "./mlruns", cwd=work, MLFLOW_ALLOW_FILE_STORE="true")
    assert_quickstart_run(run, param1, foo)
    assert run["artifact_uri"] == str(run_dir / "artifacts")


def test_file_store_is_refused_without_the_opt_in(tmp_path):
    """What docs/tutorial.md says about MLflow 3.17: the file store needs MLFLOW_ALLOW_FILE_STORE."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart" / "mlflow_tracking.py")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
                            env=clean_env(MLFLOW_TRACKING_URI="./mlruns"))
    assert result.returncode != 0
    assert "maintenance mode" in result.stderr and "MLFLOW_ALLOW_FILE_STORE=true" in result.stderr


def test_scenario_2_sqlite_and_local_artifacts(tmp_path):
    work = tmp_path / "s2"
    result = scenario("2", "--workdir", str(work))
    assert result.returncode == 0, result.stderr[-4000:]
    run_id, param1, foo = quickstart_logged(result.stdout + result.stderr)
    assert (work / "mlruns.db").is_file()
    # Only artifacts are files; the run's entities live in SQLite.
    files = sorted(str(p.relative_to(work)) for p in (work / "mlruns").rglob("*") if p.is_file())
    assert files == [f"mlruns/1/{run_id}/artifacts/outputs/foo.csv",
                     f"mlruns/1/{run_id}/artifacts/outputs/test.txt"]
    assert "The SQLite database mlruns.db" in result.stderr and "params (1 rows)" in result.stdout
    run = read_run(run_id, "sqlite:///mlruns.db", cwd=work)
    assert_quickstart_run(run, param1, foo)


@pytest.mark.parametrize("name,backend", [("3a", "file"), ("3b", "sqlite")])
def test_scenario_3_local_server_client_writes_artifacts(tmp_path, name, backend):
    work = tmp_path / f"s{name}"
    result = scenario(name, "--workdir", str(work))
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    run_id, param1, foo = quickstart_logged(output)
    port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+) \(pid (\d+)\)", output).group(1))
    pid = int(re.search(r"stopped the MLflow server \(pid (\d+)\)", output).group(1))
    assert "--no-serve-artifacts --default-artifact-root ./mlruns" in output
    assert "Tracking URI:      http://127.0.0.1:" in output
    # What it started is gone again.
    assert not port_answers(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (work / "mlflow-server.log").is_file()
    # The server wrote the entities; the client itself wrote the artifacts to ./mlruns.
    artifacts = work / "mlruns"
    assert list(artifacts.glob(f"*/{run_id}/artifacts/outputs/test.txt"))
    if backend == "file":
        assert list(artifacts.glob(f"*/{run_id}/params/param1")) and not (work / "mlruns.db").exists()
        run = read_run(run_id, "./mlruns", cwd=work, MLFLOW_ALLOW_FILE_STORE="true")
    else:
        assert (work / "mlruns.db").is_file() and not list(artifacts.glob(f"*/{run_id}/params"))
        run = read_run(run_id, "sqlite:///mlruns.db", cwd=work)
    assert_quickstart_run(run, param1, foo)


def test_default_workdir_is_temporary_and_removed():
    result = scenario("2")
    assert result.returncode == 0, result.stderr[-4000:]
    workdir = re.search(r"Running the quickstart in (\S+):", result.stderr).group(1)
    assert "mlflow-scenario-2." in workdir
    assert not Path(workdir).exists()
    assert "Read back through MlflowClient" in result.stdout


# --- the Palmer penguins notebooks ----------------------------------------------------------------

def test_dataset_matches_the_palmerpenguins_package():
    result = subprocess.run([sys.executable, str(PENGUINS / "data" / "make_dataset.py"), "--check"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "333 rows" in result.stdout


def test_notebooks_are_stored_without_outputs_and_read_the_environment():
    import nbformat

    for name in NOTEBOOKS:
        notebook = nbformat.read(PENGUINS / name, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code, name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"
        source = "\n".join(c.source for c in code)
        assert "set_tracking_uri" not in source, f"{name} must take the tracking URI from the environment"
        assert "torch" not in source
        assert 'os.environ.get("PENGUINS_EXPERIMENT"' in source


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    """The three notebooks, run in order with nbclient against a fresh SQLite store."""
    base = tmp_path_factory.mktemp("penguins")
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{base}/tracking.db",
                    PENGUINS_MODEL_NAME="penguins-unit-test")
    result = subprocess.run([sys.executable, str(RUNNER), "--workdir", str(base / "work"),
                             "--save-executed", str(base / "executed")],
                            capture_output=True, text=True, env=env, timeout=900, check=False)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    timings = {name: float(seconds) for name, seconds in
               re.findall(r"^(\S+\.ipynb): ran in ([\d.]+) s$", result.stdout, re.M)}
    summary = subprocess.run([sys.executable, str(RUNNER), "--summary"], capture_output=True,
                             text=True, env=env, timeout=300, check=False)
    assert summary.returncode == 0, summary.stderr[-4000:]
    return {"base": base, "timings": timings, "summary": json.loads(summary.stdout)}


def executed_text(notebooks, name: str) -> str:
    import nbformat

    notebook = nbformat.read(notebooks["base"] / "executed" / name, as_version=4)
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                     for o in c.outputs)


def test_notebooks_run_headless_in_order_and_quickly(notebooks):
    assert list(notebooks["timings"]) == NOTEBOOKS
    for name, seconds in notebooks["timings"].items():
        assert seconds < 180, f"{name} took {seconds:.0f} s"
    # Nothing is written next to the stored notebooks.
    assert not (PENGUINS / "mlruns").exists() and not (PENGUINS / "mlflow.db").exists()


def test_notebook_1_logs_params_metrics_plots_and_models(notebooks):
    runs = notebooks["summary"]["experiments"]["palmer-penguins"]["runs"]
    training = [r for r in runs if r["tags"].get("stage") == "training"]
    assert sorted(r["name"] for r in training) == ["decision_tree", "logistic_regression", "random_forest", "svc"]
    for run in training:
        assert run["status"] == "FINISHED"
        assert run["params"]["model_type"] == run["name"]
        assert any(key.startswith("classifier__") for key in run["params"])
        assert 0.9 <= run["metrics"]["accuracy"] <= 1.0 and "f1_macro" in run["metrics"]
        assert {"plots/confusion_matrix.png", "reports/classification_report.txt"} <= set(run["artifacts"])
        assert run["datasets"] == ["palmer-penguins"]
        [model] = run["models"]
        assert model["uri"].startswith("models:/m-") and "sklearn" in model["flavors"]
        assert model["input_example"] is True
        assert model["signature_inputs"] == ["island", "bill_length_mm", "bill_depth_mm",
                                             "flipper_length_mm", "body_mass_g", "sex"]


def test_notebook_2_registers_aliases_predicts_and_serves(notebooks):
    summary = notebooks["summary"]
    runs = {r["run_id"]: r for r in summary["experiments"]["palmer-penguins"]["runs"]}
    registered = summary["registered_model"]
    assert registered["name"] == "penguins-unit-test"
    assert [v["version"] for v in registered["versions"]] == ["1", "2"]
    assert registered["aliases"] == {"champion": "1", "challenger": "2"}
    by_version = {v["version"]: v for v in registered["versions"]}
    champion, challenger = runs[by_version["1"]["run_id"]], runs[by_version["2"]["run_id"]]
    best = max(r["metrics"]["accuracy"] for r in runs.values() if r["tags"].get("stage") == "training")
    assert champion["metrics"]["accuracy"] == best >= challenger["metrics"]["accuracy"]
    assert by_version["1"]["source"] == champion["models"][0]["uri"]
    assert by_version["1"]["tags"]["validation_status"] == "approved"
    assert by_version["2"]["tags"]["validation_status"] == "pending"

    [batch] = [r for r in runs.values() if r["name"] == "batch-predictions"]
    assert batch["artifacts"] == ["predictions/penguins_scored.json"]
    assert batch["metrics"]["champion_accuracy"] > 0.95 and batch["tags"]["champion_version"] == "1"

    text = executed_text(notebooks, "2_Deploy_and_manage.ipynb")
    served = re.search(r"served predictions: (\[.*\])", text)
    assert served and len(ast.literal_eval(served.group(1))) == 5, text[-3000:]
    port = int(re.search(r"server on port (\d+) stopped", text).group(1))
    assert not port_answers(port)


def test_notebook_3_autolog_nested_runs_tags_and_restore(notebooks):
    tips = notebooks["summary"]["experiments"]["palmer-penguins-tips"]
    assert tips["tags"]["team"] == "penguins" and "mlflow.note.content" in tips["tags"]
    runs = {r["name"]: r for r in tips["runs"]}

    autolog = runs["autolog-logistic-regression"]
    assert autolog["metrics"]["training_accuracy_score"] > 0.9 and "Pipeline_score_X_test" in autolog["metrics"]
    assert len(autolog["params"]) > 10 and autolog["models"]

    sweep = runs["sweep-max-depth"]
    children = [r for r in tips["runs"] if r["tags"].get("mlflow.parentRunId") == sweep["run_id"]]
    assert sorted(int(r["params"]["max_depth"]) for r in children) == [1, 2, 3, 4, 6, 8]
    assert sweep["metrics"]["best_accuracy"] == max(r["metrics"]["accuracy"] for r in children)
    assert sweep["tags"]["reviewed"] == "yes" and "Best: max_depth=" in sweep["tags"]["mlflow.note.content"]
    assert sweep["metrics"]["children"] == 6

    throwaway = runs["throwaway"]
    assert throwaway["lifecycle_stage"] == "active" and throwaway["tags"]["restored"] == "true"
    text = executed_text(notebooks, "3_Tips_and_tricks.ipynb")
    assert "after delete:  deleted" in text and "DELETED_ONLY finds it:   True" in text
    assert "after restore: active" in text
