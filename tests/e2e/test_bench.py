"""Runs tests/bench.py against the deployed stack and shows its figures in the
test output. It measures; it does not judge (no timed assertions)."""

import re
import subprocess
import sys

from stack.paths import ROOT


def test_benchmark_prints_figures(stack, capsys):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "--artifact-mib", "100"],
                            capture_output=True, text=True, env=stack.client_environ(), timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = re.findall(r"^  (.+?)\s+(\d+\.\d)$", result.stdout, re.M)
    assert len(figures) == 9, result.stdout
    with capsys.disabled():
        print("\n" + result.stdout)
