"""Upgrade: data written by the previous MLflow minor release, then the pinned one.

A second stack (own project, ports and volumes) is deployed with
MLFLOW_VERSION set to the previous minor release, a client logs to it, and
./stack_deploy.sh without the override must back up, migrate and keep all data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from . import gateway
from .conftest import Stack, new_stack, stack_lifetime

pytestmark = pytest.mark.slow

PREVIOUS = "3.16.1"  # the newest release of the previous minor line


@pytest.fixture(scope="module")
def old_stack(standins, tmp_path_factory):
    """Its own stack, deployed by the test (first with the previous release); it does
    not need the shared deployment, so this module alone costs only this one."""
    the_stack = new_stack(standins, tmp_path_factory.mktemp("upgrade"), "mlflowupg")
    with stack_lifetime(the_stack, deploy=False):
        yield the_stack


def server_version(s: Stack) -> str:
    response = s.http("GET", "/version")
    assert response.status_code == 200, response.text
    return response.text.strip()


def test_upgrade_from_the_previous_minor_keeps_all_data(old_stack):
    old_stack.deploy(extra={"MLFLOW_VERSION": PREVIOUS})
    assert server_version(old_stack) == PREVIOUS
    out = old_stack.workdir / "old-run.json"
    old_stack.client("write", str(out), "--blob-mib", "21", extra={"E2E_EXPERIMENT": "written-by-previous"})
    gateway.create_under_builtin_key(old_stack, "upg-openai", "sk-stored-before-the-key-0123456789")
    runs_before = old_stack.psql("SELECT count(*) FROM runs")
    revision_before = old_stack.psql("SELECT version_num FROM alembic_version")

    result = old_stack.deploy()
    assert server_version(old_stack) not in ("", PREVIOUS)
    revision_after = old_stack.psql("SELECT version_num FROM alembic_version")
    assert revision_after != revision_before, "the schema was not migrated"
    assert f"Upgraded the MLflow schema from {revision_before} to {revision_after}" in result.stderr
    pre = sorted(Path(old_stack.environ["BACKUP_DIR"]).glob("mlflow-backup-*-pre-upgrade"))
    assert len(pre) == 1, "no pre-upgrade backup"
    manifest = json.loads((pre[0] / "manifest.json").read_text())
    assert manifest["mlflow_version"] == PREVIOUS and manifest["alembic_version"] == revision_before
    assert re.search(r"db/db_volume_restore\.sh \S+-pre-upgrade", result.stderr)

    assert old_stack.psql("SELECT count(*) FROM runs") == runs_before
    old_stack.client("read", str(out))
    # The gateway secret stored under MLflow's built-in key was moved to the installation's own.
    assert gateway.read_back(old_stack, "upg-openai") == {
        "value": {"api_key": "sk-stored-before-the-key-0123456789"}, "builtin_key": "refused"}
    assert "1 moved from MLflow's built-in key" in old_stack.compose("logs", "--no-color", "migrate").stdout

    again = old_stack.deploy()
    assert "Schema: current" in again.stderr
    assert len(sorted(Path(old_stack.environ["BACKUP_DIR"]).glob("*-pre-upgrade"))) == 1
