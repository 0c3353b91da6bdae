"""Runs bench/bench.py against the deployed stack and shows its figures in the
test output. It measures; it does not judge (no timed assertions)."""

import re
import subprocess
import sys

import pytest

from stack.paths import ROOT

from .conftest import show


def stack_memory_mib(stack) -> tuple[float, int]:
    """The sum of `docker stats` memory over the stack's running containers (MiB), and their count."""
    ids = stack.compose("ps", "-q").stdout.split()  # running ones only
    out = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", *ids],
                         capture_output=True, text=True, check=True).stdout
    units = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
    total, count = 0.0, 0
    for line in out.splitlines():
        used = line.split("/")[0].strip()
        number, unit = re.fullmatch(r"([\d.]+)\s*([KMG]?i?B)", used).groups()
        total, count = total + float(number) * units[unit], count + 1
    return total, count


def test_benchmark_prints_figures(stack):
    # Before any benchmark traffic: the stack as the earlier tests leave it, at rest.
    memory, containers = stack_memory_mib(stack)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--artifact-mib", "100"],
                            capture_output=True, text=True, env=stack.client_environ(), timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = re.findall(r"^  (.+?)\s+(\d+\.\d)$", result.stdout, re.M)
    assert len(figures) == 9, result.stdout
    show(f"memory at rest, before the benchmark: {memory:,.0f} MiB over {containers} running containers\n"
         f"(other modules may run side by side)\n{result.stdout}")


def test_comparison_with_a_plain_server_prints_a_table(stack):
    """A short `bench/bench.py --compare` (docs/performance.md's table comes from the full one)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--compare", "--rounds", "1",
                             "--calls", "20", "--batches", "1", "--artifact-mib", "10",
                             "--image", f"mlflow-stack/mlflow:{stack.values()['MLFLOW_VARIANT']}"],
                            capture_output=True, text=True, timeout=900, check=False,
                            # The stack's .env, and the port the tests chose (not in .env).
                            env=stack.client_environ({"STACK_ENV_FILE": stack.environ["STACK_ENV_FILE"],
                                                      "COMPOSE_PROJECT_NAME": stack.project,
                                                      "S3_PORT": stack.values()["S3_PORT"]}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^\| (log_metric|log_batch|artifact)[^|]*\| ?([\d,.]*) \| ([\d,./ ]+) \| (\d+\.\d\d) \|$",
                      result.stdout, re.M)
    # 3 concurrencies x (req/s, p50) + 3 log_batch + up, down + the two boto3 comparisons,
    # + the server CPU per 1000 metrics at each concurrency where cgroups are readable.
    assert len(rows) in (13, 16), result.stdout
    show(result.stdout)


def test_searching_many_runs_prints_where_its_time_goes(stack):
    """A short `bench/search.py` (docs/performance.md's figures come from 100,000 runs): it seeds
    runs through MLflow's tables, times searches through the stack, and removes what it seeded."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "search.py"), "--runs", "2000", "--queries", "3"],
                            capture_output=True, text=True, timeout=900, check=False,
                            env=stack.client_environ({"STACK_ENV_FILE": stack.environ["STACK_ENV_FILE"],
                                                      "COMPOSE_PROJECT_NAME": stack.project}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^  (.+?)\s+p50\s+(\d+) ms  p95\s+(\d+) ms  \((\d+) runs returned\)$", result.stdout, re.M)
    assert len(rows) == 3 and all(int(found) == 100 for *_, found in rows), result.stdout
    assert re.search(r"main statement in PostgreSQL: \d+ ms", result.stdout), result.stdout
    experiment = re.search(r"into experiment (\d+)", result.stdout).group(1)
    # Found by the searches while they were there; gone afterwards, the experiment deleted.
    assert stack.psql(f"SELECT count(*) FROM runs WHERE experiment_id = {experiment}") == "0"
    assert stack.psql(f"SELECT lifecycle_stage FROM experiments WHERE experiment_id = {experiment}") == "deleted"
    show(result.stdout)


@pytest.mark.browser
def test_the_ui_first_load_prints_where_its_time_goes(stack):
    """bench/ui_load.py, one load in Chromium (docs/performance.md has the full run's figures)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ui_load.py"), "--loads", "1"],
                            capture_output=True, text=True, env=stack.client_environ(), timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = dict((name.strip(), float(value)) for name, value in
                   re.findall(r"^  (.+?)\s+(\d+)$", result.stdout, re.M))
    # The app loaded its scripts compressed, ran them and showed the experiment's row.
    assert figures["rows shown ms"] > 0 and figures["DOMContentLoaded ms"] > 0, result.stdout
    assert figures["scripts and styles"] >= 1 and 0 < figures["on the wire KiB"] < figures["unpacked KiB"], result.stdout
    show(result.stdout)
