"""The stack's tracking store: MLflow's SQL store with a lighter write path for metrics.

Stock MLflow turns every logged metric point into an ORM object and looks each
`latest_metrics` row up, locks it and rewrites it in Python: 67-78 ms of server
CPU per 1000 points measured here on PostgreSQL (39 ms with the statements
below, before COPY). Here the same rows are written with two statements per call:

- one multi-row INSERT (COPY on PostgreSQL) into `metrics` (a point already stored, as a retried
  request carries, makes it fail as a whole: then MLflow's own path runs,
  which skips such points and stores the rest), and
- one multi-row upsert into `latest_metrics` that replaces a key's row only
  when the new point is more recent by (step, timestamp, value): stock MLflow's
  rule, with its strict comparison, decided by the database under the row lock
  the upsert takes.

On PostgreSQL (psycopg2) the points go by COPY and the upsert takes its rows
as arrays, in one statement: the multi-row INSERT took the database 18.5 ms
per 1000 points (its 6000 literals parsed, then the rows) and psycopg2 sent
the upsert once per key. Measured in the server's container, alternating, the
store's log_batch of 1000 points: 26-35 ms instead of 46-57 (p50), 10-14 ms of
CPU instead of 22.5.

Searches (`search_runs`) first find the page's run ids, then load those runs. MLflow
selects whole runs with DISTINCT (a dataset filter's join can repeat a run), so the
database sorted every matching run with all its columns before it could keep the first
100: most of the statement's time (docs/performance.md). Here the ids are found by the
same filters and the same order, on narrow rows and without DISTINCT where no join can
repeat a run (metric, param and tag filters and sort keys join on their primary key);
then just those runs are loaded, as MLflow loads them (its eager options, inputs and
outputs). A search with a dataset filter, or without a page size, is MLflow's own.

Validation, NaN/Inf handling, duplicate removal within a call, the run's state
check, the deadlock retry (`_log_metrics` around this) and everything else are
MLflow's own. PostgreSQL and SQLite get this path; other databases, and
workspaces, get the stock store. Registered for the `postgresql` scheme (entry
point group mlflow.tracking_store, which MLflow reads after its own), so the
server picks it up with the URI unchanged.
"""

from __future__ import annotations

import functools
import os

# No MLflow import at module level: MLflow loads this entry point while its own
# tracking package is still initialising (a circular import would make it fall
# back to its stock store, with only a warning).

LIGHT_DIALECTS = ("postgresql", "sqlite")


def _insert(db_type: str):
    if db_type == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def newest_per_key(rows: list[dict]) -> list[dict]:
    """For each key, the first row with the greatest (step, timestamp, value):
    what stock MLflow's one-by-one strict comparison leaves."""
    newest: dict[str, dict] = {}
    for row in rows:
        current = newest.get(row["key"])
        if current is None or (row["step"], row["timestamp"], row["value"]) > \
                (current["step"], current["timestamp"], current["value"]):
            newest[row["key"]] = row
    return [newest[key] for key in sorted(newest)]


# COPY's text format: these characters of a value are written escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_METRICS = "COPY metrics (key, value, timestamp, run_uuid, step, is_nan) FROM STDIN"
# The same rule as the SQLAlchemy statement (_latest_upsert): a key's row is replaced only
# by a strictly more recent point. Rows in the database's order of keys, as MLflow's own
# path locks them (ORDER BY run_uuid, key): one lock order for both.
_UPSERT_LATEST = """
INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
SELECT * FROM unnest(%s::varchar[], %s::float8[], %s::int8[], %s::int8[], %s::bool[], %s::varchar[])
    AS given (key, value, timestamp, step, is_nan, run_uuid)
ORDER BY run_uuid, key
ON CONFLICT (key, run_uuid) DO UPDATE
SET value = excluded.value, timestamp = excluded.timestamp, step = excluded.step, is_nan = excluded.is_nan
WHERE (excluded.step, excluded.timestamp, excluded.value)
    > (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)
"""


def copy_lines(rows: list[dict]) -> str | None:
    """The rows as COPY text, or None if a value is not of a type written here exactly as
    the driver would bind it (a float step, say, which PostgreSQL rounds: the INSERT then)."""
    lines = []
    for row in rows:
        value, timestamp, step = row["value"], row["timestamp"], row["step"]
        if type(value) not in (float, int) or type(timestamp) is not int or type(step) is not int:
            return None
        lines.append(f"{row['key'].translate(_COPY_ESCAPES)}\t{float(value)!r}\t{timestamp}\t"
                     f"{row['run_uuid'].translate(_COPY_ESCAPES)}\t{step}\t{'t' if row['is_nan'] else 'f'}\n")
    return "".join(lines)


def _copy_to_postgresql(session, ordered: list[dict], newest: list[dict]) -> bool:
    """The points by COPY and the latest values by one upsert, on PostgreSQL through
    psycopg2; False (nothing done) elsewhere. A driver error during the COPY is raised as
    SQLAlchemy raises one (a lost connection invalidated), so MLflow's session and
    deadlock retry treat it alike; the upsert goes through SQLAlchemy itself."""
    import contextlib
    import io

    import sqlalchemy.exc

    connection = session.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg2":
        return False
    text = copy_lines(ordered)  # newest holds some of the same rows
    if text is None:
        return False
    dbapi, raw = dialect.loaded_dbapi, connection.connection.dbapi_connection
    cursor = raw.cursor()
    try:
        cursor.copy_expert(_COPY_METRICS, io.StringIO(text))
    except dbapi.Error as exc:
        gone = dialect.is_disconnect(exc, raw, cursor)
        if gone:
            connection.invalidate(exc)
        raise sqlalchemy.exc.DBAPIError.instance(_COPY_METRICS, None, exc, dbapi.Error,
                                                 connection_invalidated=gone, dialect=dialect) from exc
    finally:
        with contextlib.suppress(dbapi.Error):
            cursor.close()
    connection.exec_driver_sql(_UPSERT_LATEST, (
        [r["key"] for r in newest], [float(r["value"]) for r in newest], [r["timestamp"] for r in newest],
        [r["step"] for r in newest], [bool(r["is_nan"]) for r in newest], [r["run_uuid"] for r in newest]))
    return True


# Tables keyed by (key, run_uuid): a subquery of one of them on one key holds a run once.
ONE_ROW_PER_RUN = ("latest_metrics", "params", "tags")


def one_row_per_run(joined) -> bool:
    """Whether a subquery MLflow joins to the runs (a filter's, a sort key's) can hold a run
    at most once, so that the ids need no DISTINCT: one of those tables, on one key."""
    from sqlalchemy.sql import operators
    from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList

    select = getattr(joined, "element", None)
    froms = select.get_final_froms() if select is not None else []
    if len(froms) != 1 or getattr(froms[0], "name", None) not in ONE_ROW_PER_RUN:
        return False
    where = select.whereclause
    terms = list(where.clauses) if isinstance(where, BooleanClauseList) and where.operator is operators.and_ \
        else [where]
    # One of the terms ANDed together: key = a value.
    return any(isinstance(t, BinaryExpression) and t.operator is operators.eq
               and getattr(t.left, "name", None) == "key" and getattr(t.left, "table", None) is froms[0]
               for t in terms)


# What the two-step search takes from MLflow (mlflow/internals.py checks them too): without
# any of them, MLflow's own search.
SEARCH_INTERNALS = {
    "mlflow.store.tracking.sqlalchemy_store": ("_get_orderby_clauses", "_get_sqlalchemy_filter_clauses",
                                                "_parse_experiment_ids", "SqlAlchemyStore._filter_experiment_ids",
                                                "SqlAlchemyStore._validate_max_results_param",
                                                "SqlAlchemyStore._get_dialect",
                                                "SqlAlchemyStore._get_eager_run_query_options",
                                                "SqlAlchemyStore._get_run_inputs",
                                                "SqlAlchemyStore._get_model_outputs_bulk"),
}


@functools.cache
def two_step_search() -> bool:
    import importlib

    for module, names in SEARCH_INTERNALS.items():
        for name in names:
            target = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part, None)
            if target is None:
                return False
    return True


@functools.cache
def store_class():
    """StackSqlStore, defined on first use (see the import note above)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    import sqlalchemy.exc
    from mlflow.utils.search_utils import SearchUtils
    from mlflow.utils.validation import _validate_metric
    from sqlalchemy import tuple_

    class StackSqlStore(SqlAlchemyStore):
        def _search_runs(self, experiment_ids, filter_string, run_view_type, max_results, order_by, page_token):
            page = self._page_of_run_ids(experiment_ids, filter_string, run_view_type, max_results, order_by,
                                         page_token)
            if page is None:
                return super()._search_runs(experiment_ids, filter_string, run_view_type, max_results, order_by,
                                            page_token)
            ids, offset = page
            more = len(ids) > max_results
            return self._runs_in_order(ids[:max_results]), (
                SearchUtils.create_page_token(offset + max_results) if more else None)

        def _runs_in_order(self, ids: list[str]) -> list:
            """These runs, in this order, as MLflow's search returns them (with their inputs
            and outputs). A run deleted since its id was found is left out."""
            from mlflow.entities import Run, RunInputs, RunOutputs
            from mlflow.store.tracking.dbmodels.models import SqlRun
            from sqlalchemy import select

            if not ids:
                return []
            with self.ManagedSessionMaker() as session:
                found = session.execute(select(SqlRun).where(SqlRun.run_uuid.in_(ids))
                                        .options(*self._get_eager_run_query_options())).scalars().all()
                by_id = {run.run_uuid: run.to_mlflow_entity() for run in found}
                runs = [by_id[i] for i in ids if i in by_id]
                run_ids = [run.info.run_id for run in runs]
                inputs = self._get_run_inputs(run_uuids=run_ids, session=session)
                outputs = self._get_model_outputs_bulk(run_ids=run_ids, session=session)
            return [Run(run.info, run.data, RunInputs(dataset_inputs=inputs[i]), RunOutputs(outputs[run.info.run_id]))
                    for i, run in enumerate(runs)]

        def _page_of_run_ids(self, experiment_ids, filter_string, run_view_type, max_results, order_by,
                             page_token):
            """(the ids of the page's runs, in order, one more if there is a next page; its
            offset), or None when MLflow's own search must run (no page size, a dataset
            filter, another database)."""
            from mlflow.entities import LifecycleStage
            from mlflow.store.tracking.dbmodels.models import SqlRun
            from mlflow.store.tracking.sqlalchemy_store import (
                _get_orderby_clauses,
                _get_sqlalchemy_filter_clauses,
                _parse_experiment_ids,
            )
            from sqlalchemy import select

            if self.db_type not in LIGHT_DIALECTS or max_results is None or not two_step_search():
                return None
            self._validate_max_results_param(max_results, allow_null=True)
            stages = set(LifecycleStage.view_type_to_stages(run_view_type))
            parsed = SearchUtils.parse_search_filter(filter_string)
            with self.ManagedSessionMaker() as session:
                cases, ordering, sorting_joins = _get_orderby_clauses(order_by, session)
                attribute_filters, joined_filters, dataset_filters = _get_sqlalchemy_filter_clauses(
                    parsed, session, self._get_dialect())
                if dataset_filters or not all(map(one_row_per_run, [*joined_filters, *sorting_joins])):
                    return None
                statement = select(SqlRun.run_uuid, *cases)
                for joined in joined_filters:
                    statement = statement.join(joined)
                for joined in sorting_joins:
                    statement = statement.outerjoin(joined)
                offset = SearchUtils.parse_start_offset_from_page_token(page_token)
                experiments = self._filter_experiment_ids(session, _parse_experiment_ids(experiment_ids))
                statement = (statement.filter(SqlRun.experiment_id.in_(experiments),
                                              SqlRun.lifecycle_stage.in_(stages), *attribute_filters)
                             .order_by(*ordering).offset(offset).limit(max_results + 1))
                return [row[0] for row in session.execute(statement)], offset

        def _log_metrics_once(self, run_id, metrics):
            if self.db_type not in LIGHT_DIALECTS:
                return super()._log_metrics_once(run_id, metrics)
            rows, seen = {}, set()
            is_single_metric = len(metrics) == 1
            for idx, metric in enumerate(metrics):
                _validate_metric(metric.key, metric.value, metric.timestamp, metric.step,
                                 path="" if is_single_metric else f"metrics[{idx}]")
                if metric in seen:
                    continue
                seen.add(metric)
                is_nan, value = self.sanitize_metric_value(metric.value)
                row = {"run_uuid": run_id, "key": metric.key, "value": value, "timestamp": metric.timestamp,
                       "step": metric.step, "is_nan": is_nan}
                # The table's identity (its primary key): NaN points are stored as 0 with is_nan.
                rows.setdefault((metric.key, metric.timestamp, metric.step, value, is_nan), row)
            if not rows:
                return
            # The newest point per key in the order sent (ties go to the first, as in MLflow);
            # then one order for every writer: concurrent calls lock index entries alike.
            newest = newest_per_key(list(rows.values()))
            ordered = [rows[identity] for identity in sorted(rows)]
            with self.ManagedSessionMaker(read_only=False) as session:
                run = self._get_run(run_uuid=run_id, session=session)
                self._check_run_is_active(run)
                try:
                    if not _copy_to_postgresql(session, ordered, newest):
                        # Parameter lists, not literal VALUES: SQLAlchemy compiles each statement
                        # once and sends the rows in multi-row batches ("insertmanyvalues"). A
                        # plain INSERT: ON CONFLICT costs PostgreSQL twice the CPU on every row,
                        # for a conflict that only a resent point causes.
                        session.execute(_insert(self.db_type)(SqlMetric.__table__), ordered)
                        session.execute(self._latest_upsert(self.db_type), newest)
                    return
                except sqlalchemy.exc.IntegrityError:
                    session.rollback()
            # A point already stored (a retried request): MLflow's own path, which skips
            # those and stores the rest. Nothing of the attempt above was committed.
            return super()._log_metrics_once(run_id, metrics)

        @staticmethod
        @functools.cache
        def _latest_upsert(db_type: str):
            # Built once: building it per call (its EXCLUDED alias and column proxies)
            # cost 0.18 ms of CPU against 0.014 ms (measured in-process, on SQLite).
            table = SqlLatestMetric.__table__
            statement = _insert(db_type)(table)
            new = statement.excluded
            return statement.on_conflict_do_update(
                index_elements=[table.c.key, table.c.run_uuid],
                set_={"value": new.value, "timestamp": new.timestamp, "step": new.step, "is_nan": new.is_nan},
                where=tuple_(new.step, new.timestamp, new.value)
                > tuple_(table.c.step, table.c.timestamp, table.c.value),
            )

    return StackSqlStore


def build(store_uri, artifact_uri=None):
    """The builder MLflow's tracking-store registry calls for postgresql:// URIs."""
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if MLFLOW_ENABLE_WORKSPACES.get():
        return _get_sqlalchemy_store(store_uri, artifact_uri)
    if not hasattr(SqlAlchemyStore, "_log_metrics_once"):
        # Another MLflow than the one this was written against (3.16-3.17): its own store.
        import warnings

        warnings.warn("stack_store: this MLflow has no _log_metrics_once; using its own SQL store", stacklevel=2)
        return _get_sqlalchemy_store(store_uri, artifact_uri)
    if artifact_uri is None:
        # As MLflow's own builder: inside the server, its configured artifact root.
        from mlflow.tracking._tracking_service.utils import (
            _SERVER_ARTIFACT_ROOT_ENV_VAR,
            DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH,
        )

        artifact_uri = os.environ.get(_SERVER_ARTIFACT_ROOT_ENV_VAR, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    return store_class()(store_uri, artifact_uri)
