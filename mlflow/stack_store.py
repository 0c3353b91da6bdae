"""The stack's tracking store: MLflow's SQL store with a lighter write path for metrics.

Stock MLflow turns every logged metric point into an ORM object and looks each
`latest_metrics` row up, locks it and rewrites it in Python: about 140 ms of
server CPU per 1000 points (field notes), most of a log_batch. Here the same
rows are written with two statements per call:

- one multi-row INSERT into `metrics` that skips a point already stored
  (ON CONFLICT on its primary key, what stock MLflow's IntegrityError fallback
  does row by row), and
- one multi-row upsert into `latest_metrics` that replaces a key's row only
  when the new point is more recent by (step, timestamp, value): stock MLflow's
  rule, with its strict comparison, decided by the database under the row lock
  the upsert takes.

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
# Rows per INSERT statement: 6 bound parameters each, far below either
# database's limit (PostgreSQL 65535, SQLite 32766).
ROWS_PER_STATEMENT = 1000


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


@functools.cache
def store_class():
    """StackSqlStore, defined on first use (see the import note above)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils.validation import _validate_metric
    from sqlalchemy import tuple_

    class StackSqlStore(SqlAlchemyStore):
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
            # One order for every writer: concurrent calls lock index entries alike.
            ordered = [rows[identity] for identity in sorted(rows)]
            insert = _insert(self.db_type)
            with self.ManagedSessionMaker(read_only=False) as session:
                run = self._get_run(run_uuid=run_id, session=session)
                self._check_run_is_active(run)
                for start in range(0, len(ordered), ROWS_PER_STATEMENT):
                    session.execute(insert(SqlMetric.__table__).values(ordered[start:start + ROWS_PER_STATEMENT])
                                    .on_conflict_do_nothing())
                table = SqlLatestMetric.__table__
                newest = newest_per_key(ordered)
                for start in range(0, len(newest), ROWS_PER_STATEMENT):
                    statement = insert(table).values(newest[start:start + ROWS_PER_STATEMENT])
                    new = statement.excluded
                    session.execute(statement.on_conflict_do_update(
                        index_elements=[table.c.key, table.c.run_uuid],
                        set_={"value": new.value, "timestamp": new.timestamp, "step": new.step,
                              "is_nan": new.is_nan},
                        where=tuple_(new.step, new.timestamp, new.value)
                        > tuple_(table.c.step, table.c.timestamp, table.c.value),
                    ))

    return StackSqlStore


def build(store_uri, artifact_uri=None):
    """The builder MLflow's tracking-store registry calls for postgresql:// URIs."""
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    if MLFLOW_ENABLE_WORKSPACES.get():
        return _get_sqlalchemy_store(store_uri, artifact_uri)
    if artifact_uri is None:
        # As MLflow's own builder: inside the server, its configured artifact root.
        from mlflow.tracking._tracking_service.utils import (
            _SERVER_ARTIFACT_ROOT_ENV_VAR,
            DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH,
        )

        artifact_uri = os.environ.get(_SERVER_ARTIFACT_ROOT_ENV_VAR, DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    return store_class()(store_uri, artifact_uri)
