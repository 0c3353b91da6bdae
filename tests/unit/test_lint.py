"""Linters on every file of their kind: hadolint, shellcheck, yamllint, Python that compiles, and
no secret file in git."""

import subprocess

import pytest

from static_checks import ROOT, SHELL_SCRIPTS, DOCKERFILES, tool


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    result = subprocess.run([tool("shellcheck"), "-x", "-P", "SCRIPTDIR", str(script)],
                            capture_output=True, text=True, check=False, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint():
    files = [ROOT / "docker-compose.yml", ROOT / "mlflow" / "conda.yml"]
    result = subprocess.run([tool("yamllint"), "-d", "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}",
                             *map(str, files)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_python_sources_compile():
    files = [*ROOT.glob("stack/*.py"), ROOT / "mlflow/entrypoint.py"]
    for f in files:
        compile(f.read_text(), str(f), "exec")


def test_no_secret_files_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert ".env" not in tracked
    assert not [t for t in tracked if t.startswith("mlflow/certs/") and t.endswith(".crt")]
