"""mlflow/internals.py against the pinned MLflow (the test venv installs mlflow/requirements.txt):
every private name the server image uses or replaces is there with the shape it expects, and
a missing or reshaped one stops with a message naming the package, its version and the name."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace

import pytest

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("internals", ROOT / "mlflow" / "internals.py")
internals = sys.modules["internals"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(internals)


def test_every_name_is_there_in_the_pinned_versions():
    assert internals.check() == []


def test_a_missing_name_stops_with_the_package_version_and_the_name(monkeypatch):
    gone = replace(internals.USED[0], name="_authenticate_cached_v2")
    monkeypatch.setattr(internals, "USED", (gone, *internals.USED[1:]))
    with pytest.raises(SystemExit) as stopped:
        internals.require("the server")
    message = str(stopped.value)
    assert "mlflow 3.17.2: mlflow.server.auth._authenticate_cached_v2" in message and "is missing" in message


def test_a_reshaped_function_is_named_with_what_it_takes_now(monkeypatch):
    reshaped = replace(internals.USED[0], params=("user", "secret"))
    monkeypatch.setattr(internals, "USED", (reshaped,))
    assert re.search(r"takes \(username, password.*\), not \(user, secret, \.\.\.\)", internals.check()[0])


def test_every_private_name_the_image_uses_is_listed():
    """A private name in the server image's code that is not in internals.USED fails here."""
    listed = {u.name.rsplit(".", 1)[-1] for u in internals.USED}
    used = set()
    for name in ("entrypoint.py", "stack_guard.py", "stack_store.py", "maintenance.py"):
        code = (ROOT / "mlflow" / name).read_text()
        used |= set(re.findall(r"\b(?:auth|handlers|artifact_router|store|super\(\))\.(_[A-Za-z][A-Za-z_]+)", code))
        used |= set(re.findall(r"\bself\.(_[a-z][a-z_]+)\(", code))
        used |= set(re.findall(r"replace_once\([\w.]+, \"(_\w+)\"", code))
        # `from mlflow... import a, _b` and its parenthesised form over several lines.
        for names in re.findall(r"^\s*from (?:mlflow|uvicorn|asyncio)[\w.]* import (\([^)]*\)|.+)$", code, re.M):
            used |= {n.strip() for n in names.strip("()").replace("\n", ",").split(",") if n.strip().startswith("_")}
    assert {"_authenticate_cached", "_get_deleted_runs", "_get_alembic_config", "_log_metrics_once",
            "_SERVER_ARTIFACT_ROOT_ENV_VAR", "_USER_AUTH_CACHE", "_set_nodelay"} <= used, used
    own = {"_latest_upsert", "_copy_points", "_error", "_page_of_run_ids", "_runs_in_order"}  # the stack's own
    assert used - own <= listed, sorted(used - own - listed)


def test_an_optional_name_missing_warns_and_goes_on(monkeypatch, capsys):
    gone = replace(next(u for u in internals.USED if u.optional), name="_no_such_class")
    monkeypatch.setattr(internals, "USED", (gone,))
    internals.require("the server")
    assert "the server: warning: " in capsys.readouterr().err
