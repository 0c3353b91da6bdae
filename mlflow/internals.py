"""Every private name of MLflow, uvicorn and asyncio the stack's server image uses or replaces,
with the shape it expects, checked in one place.

A name that an upgrade removed or reshaped would otherwise break somewhere silently (a
patch skipped, a gc step gone, a 500 in one route). The server (mlflow/entrypoint.py) and
the gc job check them all before starting and stop with one message naming the package,
its version and the name; tests/unit/test_internals.py runs the same check against the
pinned versions. Using a new private name: add it here first.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Internal:
    module: str
    name: str  # attribute path below the module, e.g. "SqlAlchemyStore._get_run"
    # "function" (then params: the leading parameter names it must take), "class" or "value".
    kind: str
    why: str
    params: tuple[str, ...] = ()
    # The code does without it (a slower path, MLflow's own): a warning, not a stop.
    optional: bool = False

    @property
    def package(self) -> str:
        return self.module.split(".")[0]


STORE = "mlflow.store.tracking.sqlalchemy_store"

USED = (
    # mlflow/stack_guard.py: the login cache, single-flight logins, the admin flag.
    Internal("mlflow.server.auth", "_authenticate_cached", "function",
             "logins checked once (single flight), the admin check for nginx", ("username", "password")),
    Internal("mlflow.server.auth", "_auth_cache_key", "function", "the single flight's key", ("username", "password")),
    Internal("mlflow.server.auth", "_USER_AUTH_CACHE", "value", "whether MLflow's login cache is on; a login "
             "found there is not throttled"),
    Internal("mlflow.server.auth", "_USER_AUTH_CACHE_LOCK", "value", "the login cache's lock"),
    Internal("mlflow.server.auth", "store", "value", "the users' database: the login throttle's tables"),
    Internal("mlflow.server.auth.sqlalchemy_store", "SqlAlchemyStore.authenticate_user", "function",
             "replaced on MLflow's store: an access token in place of a password", ("self", "username", "password")),
    Internal("mlflow.server.auth", "_invalidate_user_auth_cache", "function",
             "a revoked token's account's cached logins dropped at once on the worker that revoked it",
             ("username",), optional=True),
    Internal("mlflow.server.auth.sqlalchemy_store", "SqlAlchemyStore.get_user", "function",
             "the account (and its id) a token belongs to", ("self", "username")),
    Internal("mlflow.server.auth", "sender_is_admin", "function", "replaced: the admin flag from the login cache"),
    Internal("mlflow.server.auth", "authenticate_request", "function", "the login of a Flask request"),
    Internal("mlflow.server.auth", "auth_config", "value", "whether the default authorization function is on"),
    Internal("mlflow.server.auth", "DEFAULT_AUTHORIZATION_FUNCTION", "value", "the basic-auth function's name"),
    # mlflow/stack_guard.py: a log_batch's metrics built directly; downloads handed to nginx.
    Internal("mlflow.server.handlers", "parse_dict", "function", "replaced: a log_batch's metrics built directly",
             ("js_dict", "message")),
    Internal("mlflow.server.handlers", "_content_disposition_attachment", "function",
             "the download's Content-Disposition"),
    Internal("mlflow.server.artifact_router", "download_artifact", "function",
             "replaced as the download route's endpoint (nginx streams the object)", ("artifact_path",)),
    Internal("mlflow.server.artifact_router", "artifact_router", "value", "the routes whose endpoint is replaced"),
    Internal("mlflow.server.artifact_router", "_is_serving_proxied_artifacts", "function", "downloads by nginx"),
    Internal("mlflow.server.artifact_router", "_get_workspace_scoped_path", "function", "downloads by nginx"),
    Internal("mlflow.server.artifact_router", "_get_artifact_repo", "function", "downloads by nginx"),
    Internal("mlflow.utils.mime_type_utils", "_guess_mime_type", "function", "the download's Content-Type"),
    Internal("mlflow.server.fastapi_app", "_EfficientWSGIMiddleware", "class",
             "calls for Flask handed to Flask at once (FlaskCallsDirect; else through FastAPI)", optional=True),
    Internal("asyncio.base_events", "_set_nodelay", "function",
             "replaced: TCP_NODELAY on every accepted connection (uvicorn#3149)", ("sock",)),
    # mlflow/stack_store.py: log_batch points by COPY.
    Internal("mlflow.utils.validation", "_validate_metric", "function", "a point checked as MLflow checks it"),
    Internal(STORE, "SqlAlchemyStore._log_metrics_once", "function",
             "overridden: points by COPY (else MLflow's own store)", ("self", "run_id", "metrics"), optional=True),
    Internal(STORE, "SqlAlchemyStore._get_run", "function", "the run a COPY writes to",
             ("self", "session", "run_uuid"), optional=True),
    Internal(STORE, "SqlAlchemyStore._check_run_is_active", "function", "a COPY into an active run only",
             ("self", "run"), optional=True),
    # mlflow/stack_store.py: searches find the page's run ids first (SEARCH_INTERNALS there).
    Internal(STORE, "SqlAlchemyStore._search_runs", "function", "overridden: searches in two steps",
             ("self", "experiment_ids", "filter_string", "run_view_type", "max_results", "order_by", "page_token")),
    Internal(STORE, "_get_orderby_clauses", "function", "a search's order, as MLflow builds it",
             ("order_by_list", "session"), optional=True),
    Internal(STORE, "_get_sqlalchemy_filter_clauses", "function", "a search's filters, as MLflow builds them",
             ("parsed", "session", "dialect"), optional=True),
    Internal(STORE, "_parse_experiment_ids", "function", "a search's experiments", optional=True),
    Internal(STORE, "SqlAlchemyStore._filter_experiment_ids", "function", "a search's experiments (workspaces)",
             ("self", "session"), optional=True),
    Internal(STORE, "SqlAlchemyStore._validate_max_results_param", "function", "a search's page size",
             optional=True),
    Internal(STORE, "SqlAlchemyStore._get_dialect", "function", "a search's filters, as MLflow builds them",
             optional=True),
    Internal(STORE, "SqlAlchemyStore._get_eager_run_query_options", "function", "runs loaded as MLflow loads them",
             optional=True),
    Internal(STORE, "SqlAlchemyStore._get_run_inputs", "function", "a found run's inputs",
             ("self", "session", "run_uuids"), optional=True),
    Internal(STORE, "SqlAlchemyStore._get_model_outputs_bulk", "function", "a found run's outputs",
             ("self", "run_ids"), optional=True),
    Internal("mlflow.tracking._tracking_service.utils", "_get_sqlalchemy_store", "function",
             "the stack's store for the postgresql scheme"),
    Internal("mlflow.tracking._tracking_service.utils", "_SERVER_ARTIFACT_ROOT_ENV_VAR", "value",
             "the server's artifact root, as MLflow's own store builder reads it"),
    Internal("mlflow.tracking._tracking_service.utils", "DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH", "value",
             "the artifact root without one, as MLflow's own store builder"),
    # mlflow/maintenance.py: garbage collection.
    Internal(STORE, "SqlAlchemyStore._get_deleted_runs", "function", "gc: runs deleted long enough ago",
             ("self", "older_than")),
    Internal(STORE, "SqlAlchemyStore._get_deleted_logged_models", "function", "gc: models deleted long enough ago",
             ("self", "older_than")),
    Internal(STORE, "SqlAlchemyStore._hard_delete_run", "function", "gc: a run's rows", ("self", "run_id")),
    Internal(STORE, "SqlAlchemyStore._hard_delete_experiment", "function", "gc: an experiment's rows",
             ("self", "experiment_id")),
    Internal(STORE, "SqlAlchemyStore._hard_delete_logged_model", "function", "gc: a model's rows",
             ("self", "model_id")),
    # mlflow/entrypoint.py: the admin account, the schema checks.
    Internal("mlflow.server", "_bootstrap_basic_auth", "function", "the admin account, once before the workers"),
    Internal("mlflow.store.db.utils", "_get_alembic_config", "function", "the tracking schema's head", ("db_url",)),
    Internal("mlflow.store.db.utils", "_get_schema_version", "function", "the tracking schema's version", ("engine",)),
    Internal("mlflow.store.db.utils", "_is_empty_database", "function", "a new database", ("engine",)),
    Internal("mlflow.server.auth.db.utils", "_get_alembic_config", "function", "the users schema's head", ("url",)),
)


def version(package: str) -> str:
    if package == "asyncio":
        import sys

        return f"Python {sys.version.split()[0]}"
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def problem(used: Internal) -> str | None:
    """What is wrong with one name in the installed packages, or None."""
    where = f"{used.module}.{used.name} ({used.why})"
    try:
        target = importlib.import_module(used.module)
        for part in used.name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        return f"{version(used.package)}: {where} is missing ({type(exc).__name__}: {exc})"
    if used.kind == "class" and not inspect.isclass(target):
        return f"{version(used.package)}: {where} is no longer a class"
    if used.kind == "function":
        # A name the stack replaced earlier in this process is checked as MLflow made it.
        if not callable(target):
            return f"{version(used.package)}: {where} is no longer callable"
        original = getattr(target, "__wrapped__", target)
        if used.params and not getattr(target, "replaced_by_stack", False):
            try:
                names = tuple(inspect.signature(original).parameters)
            except (TypeError, ValueError):
                return None
            if names[:len(used.params)] != used.params:
                return (f"{version(used.package)}: {where} takes ({', '.join(names)}), "
                        f"not ({', '.join(used.params)}, ...)")
    return None


def check(modules: set[str] | None = None, optional: bool | None = None) -> list[str]:
    """Problems with every name (or those of the modules named; optional: only those that are,
    or are not, optional)."""
    chosen = [u for u in USED if (modules is None or u.module in modules)
              and (optional is None or u.optional == optional)]
    return [p for p in map(problem, chosen) if p]


def require(what: str, modules: set[str] | None = None) -> None:
    """Stop (SystemExit) with one message when any required name (of the modules named) is
    missing or reshaped; warn about the optional ones (the code does without them)."""
    import sys

    for warning in check(modules, optional=True):
        print(f"{what}: warning: {warning}; doing without it", file=sys.stderr, flush=True)
    problems = check(modules, optional=False)
    if problems:
        raise SystemExit(f"{what}: the installed packages lack what the stack uses (mlflow/internals.py); "
                         "pin the versions it was made for (mlflow/requirements.txt) or update the stack:\n  - "
                         + "\n  - ".join(problems))
