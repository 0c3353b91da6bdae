"""A route sweep: every route the server's MLflow registers (its Flask rules, with
basic-auth's, and its FastAPI routes), called through nginx without a login, must answer
401, at the root and under MLFLOW_BASE_PATH. The routes are listed by the server's own image
(the same MLflow), so a route a new MLflow adds is swept without a change here.

Public, by MLflow's design (mlflow.server.auth, is_unprotected_route), and why:
- /health: healthchecks and load balancers;
- /static-files/...: the UI's JavaScript and images (no data);
- server-info (REST 3.0): how the server is configured (auth on, workspaces...), which a
  client reads before it logs in; MLflow keeps secrets out of it.
"""

from __future__ import annotations

import json
import re

import pytest

PUBLIC = {
    "/health": "healthchecks",
    "/static-files/<path:path>": "the UI's assets",
    "/api/3.0/mlflow/server-info": "a client reads it before logging in",
    "/ajax-api/3.0/mlflow/server-info": "the UI reads it before logging in",
}

# Runs in the server's image: every (path, method) its MLflow registers.
LIST_ROUTES = r'''
import json, os, tempfile
os.chdir(tempfile.mkdtemp())
os.environ.update(MLFLOW_TRACKING_URI="sqlite:///routes.db", MLFLOW_FLASK_SERVER_SECRET_KEY="route-sweep",
                  MLFLOW_AUTH_ADMIN_PASSWORD="route-sweep-only-0123456789")
from mlflow.server.auth import create_app
create_app()
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import create_fastapi_app
routes = set()
for rule in flask_app.url_map.iter_rules():
    for method in rule.methods - {"HEAD", "OPTIONS"}:
        routes.add((rule.rule, method))
def walk(found, prefix=""):
    for route in found:
        context = getattr(route, "include_context", None)
        if context is not None:
            walk(context.included_router.routes, prefix + context.prefix)
        elif getattr(route, "methods", None):
            for method in route.methods - {"HEAD", "OPTIONS"}:
                routes.add((prefix + route.path, method))
walk(create_fastapi_app().routes)
print(json.dumps(sorted(routes)))
'''


def concrete(template: str) -> str:
    """A path for a route template: each parameter (Flask's <x>, FastAPI's {x}) as a made-up value."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "x1", template)


@pytest.fixture(scope="module")
def routes(stack):
    listed = stack.compose("exec", "-T", "mlflow", "python3", "-c", LIST_ROUTES, timeout=300).stdout
    found = [tuple(r) for r in json.loads(listed.strip().splitlines()[-1])]
    # MLflow 3.17 registers some 460 Flask rules and 80 FastAPI routes: a short list means
    # the listing broke, not that the server has few routes.
    assert len(found) > 500, len(found)
    assert ("/v1/traces", "POST") in found and ("/api/2.0/mlflow/users/create", "POST") in found, found[:20]
    return found


def test_every_route_needs_a_login_but_the_public_few(target, routes):
    answers: dict[int, list] = {}
    for template, method in routes:
        answer = target.http(method, concrete(template), auth=False, timeout=30)
        answers.setdefault(answer.status_code, []).append((method, template))
    public = {template for status in answers if status != 401 for _, template in answers[status]}
    assert public <= set(PUBLIC), {s: a for s, a in answers.items() if s != 401}
    print(f"{len(routes)} routes: " + ", ".join(f"{len(a)} answered {s}" for s, a in sorted(answers.items())))
