"""The tutorial on the deployed stack (scenario 4 of docs/tutorial.md).

As a user would: with only the settings ./stack_deploy.sh printed, run the
quickstart through `examples/scenarios.sh stack`, then the three Palmer
penguins notebooks. Everything is read back through the server in a separate
process, and the entities are checked in PostgreSQL. Experiment and model
names are unique per test run, and nothing here assumes how many experiments
the stack already holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stack import envfile, paths

ROOT = paths.ROOT
SCENARIOS = ROOT / "examples" / "scenarios.sh"
TOOLS = ROOT / "examples" / "_scenario_tools.py"
RUNNER = ROOT / "examples" / "palmer_penguins" / "run_notebooks.py"


def user_env(stack, with_client_env: bool = True, **extra: str) -> dict[str, str]:
    """A user's shell: no stack or MLflow settings except, optionally, the printed ones."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "STACK_", "COMPOSE_", "PENGUINS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if with_client_env:
        env.update(stack.client_env)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: int, cwd: Path | None = None) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    print(f"{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} {' '.join(cmd[2:4])}: "
          f"exit {result.returncode} in {time.monotonic() - started:.0f} s")
    return result


def check_quickstart(stack, result: subprocess.CompletedProcess, workdir: Path, experiment: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    run_id = re.findall(r"^run_id=([0-9a-f]{32})$", result.stdout, re.M)[-1]
    param1 = re.search(r"Logged param1=(\d+), foo=\[([^\]]*)\]", output)
    foo = [float(v) for v in param1.group(2).split(",")]
    # The client wrote nothing locally: entities went to PostgreSQL, artifacts through the server.
    assert list(workdir.iterdir()) == []

    read = run([sys.executable, str(TOOLS), "run-json", run_id], env=user_env(stack), timeout=300)
    assert read.returncode == 0, read.stderr[-4000:]
    logged = json.loads(read.stdout)
    assert logged["experiment"]["name"] == experiment
    assert logged["tracking_uri"] == stack.client_env["MLFLOW_TRACKING_URI"]
    assert logged["params"] == {"param1": param1.group(1)}
    assert logged["metrics"]["foo"] == [[step, value] for step, value in enumerate(foo)]
    assert logged["artifacts"]["outputs/test.txt"]["text"] == "hello world!\n"
    assert sorted(logged["artifacts"]) == ["outputs/foo.csv", "outputs/test.txt"]
    if stack.values()["MLFLOW_ARTIFACTS_MODE"] == "proxied":
        assert logged["artifact_uri"].startswith("mlflow-artifacts:/"), logged["artifact_uri"]

    assert stack.psql(f"SELECT key || '=' || value FROM params WHERE run_uuid = '{run_id}'") == \
        f"param1={param1.group(1)}"
    assert stack.psql(f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}' AND key = 'foo'") == str(len(foo))


def test_quickstart_with_the_printed_tracking_uri(stack, tmp_path):
    experiment = f"quickstart-e2e-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "work"
    result = run([str(SCENARIOS), "stack", "--workdir", str(workdir)], timeout=600,
                 env=user_env(stack, MLFLOW_EXPERIMENT_NAME=experiment))
    check_quickstart(stack, result, workdir, experiment)


def test_quickstart_takes_the_settings_from_show_all(stack, tmp_path):
    """Without MLFLOW_TRACKING_URI the script asks ./show_all.sh --client-env."""
    experiment = f"quickstart-e2e-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "work"
    # The deploying shell's settings: its .env, plus what it overrode (ports, host).
    settings = {key: stack.environ[key] for key in envfile.parse(stack.env_file.read_text())
                if key in stack.environ}
    env = user_env(stack, with_client_env=False, MLFLOW_EXPERIMENT_NAME=experiment,
                   STACK_ENV_FILE=stack.environ["STACK_ENV_FILE"],
                   COMPOSE_PROJECT_NAME=stack.environ["COMPOSE_PROJECT_NAME"],
                   STACK_CERT_DIR=stack.environ["STACK_CERT_DIR"], **settings)
    result = run([str(SCENARIOS), "stack", "--workdir", str(workdir)], env=env, timeout=600)
    assert "settings from ./show_all.sh --client-env" in result.stderr, result.stderr[-3000:]
    check_quickstart(stack, result, workdir, experiment)


@pytest.fixture(scope="module")
def notebooks(stack, tmp_path_factory):
    base = tmp_path_factory.mktemp("tutorial-notebooks")
    suffix = uuid.uuid4().hex[:8]
    names = {"PENGUINS_EXPERIMENT": f"palmer-penguins-e2e-{suffix}",
             "PENGUINS_MODEL_NAME": f"penguins-e2e-{suffix}"}
    env = user_env(stack, **names)
    result = run([sys.executable, str(RUNNER), "--workdir", str(base / "work"),
                  "--save-executed", str(base / "executed")], env=env, timeout=1500)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    summary = run([sys.executable, str(RUNNER), "--summary"], env=env, timeout=600)
    assert summary.returncode == 0, summary.stderr[-4000:]
    return {**names, "summary": json.loads(summary.stdout), "output": result.stdout}


def test_notebook_1_tracks_runs_and_models_on_the_stack(notebooks):
    experiment = notebooks["PENGUINS_EXPERIMENT"]
    runs = notebooks["summary"]["experiments"][experiment]["runs"]
    training = [r for r in runs if r["tags"].get("stage") == "training"]
    assert sorted(r["name"] for r in training) == ["decision_tree", "logistic_regression", "random_forest", "svc"]
    for run_ in training:
        assert run_["status"] == "FINISHED" and run_["metrics"]["accuracy"] >= 0.9
        assert {"plots/confusion_matrix.png", "reports/classification_report.txt"} <= set(run_["artifacts"])
        [model] = run_["models"]
        assert model["input_example"] and "sex" in model["signature_inputs"]


def test_notebook_2_registers_aliases_and_serves_on_the_stack(stack, notebooks):
    name = notebooks["PENGUINS_MODEL_NAME"]
    registered = notebooks["summary"]["registered_model"]
    assert registered["name"] == name
    assert registered["aliases"] == {"champion": "1", "challenger": "2"}
    runs = {r["run_id"]: r for r in notebooks["summary"]["experiments"][notebooks["PENGUINS_EXPERIMENT"]]["runs"]}
    champion = runs[registered["versions"][0]["run_id"]]
    challenger = runs[registered["versions"][1]["run_id"]]
    assert champion["metrics"]["accuracy"] >= challenger["metrics"]["accuracy"]
    assert any(r["name"] == "batch-predictions" and r["artifacts"] == ["predictions/penguins_scored.json"]
               for r in runs.values())
    # In PostgreSQL, where the stack keeps the registry.
    assert stack.psql(f"SELECT alias || '=' || version FROM registered_model_aliases "
                      f"WHERE name = '{name}' ORDER BY alias") == "challenger=2\nchampion=1"


def test_notebook_3_tips_on_the_stack(notebooks):
    tips = notebooks["summary"]["experiments"][notebooks["PENGUINS_EXPERIMENT"] + "-tips"]
    runs = {r["name"]: r for r in tips["runs"]}
    sweep = runs["sweep-max-depth"]
    children = [r for r in tips["runs"] if r["tags"].get("mlflow.parentRunId") == sweep["run_id"]]
    assert len(children) == 6 and sweep["tags"]["reviewed"] == "yes"
    assert runs["autolog-logistic-regression"]["models"]
    assert runs["throwaway"]["lifecycle_stage"] == "active" and runs["throwaway"]["tags"]["restored"] == "true"
