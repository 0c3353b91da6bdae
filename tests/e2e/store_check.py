"""Run inside the mlflow container (python3 - < store_check.py): the stack's tracking
store against MLflow's own on the stack's PostgreSQL. Prints one JSON line.

- The same random batches (duplicates, resent points, NaN, infinities, ties) to a
  run of each store: the metric history and the latest values must be equal.
- The stack's store took its COPY path, and MLflow's own after a resent point.
- Two threads sending batches to one run of the stack's store at once (the same
  keys, different points): no error, every point stored once, and the latest
  values as MLflow's own store leaves for the same points.
"""

import json
import math
import random
import threading

from mlflow.entities import Metric
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from stack import common

import stack_store

URI = common.database_uri()


def state(store, run_id, keys):
    def point(m):
        return [m.step, m.timestamp, math.isnan(m.value), 0.0 if math.isnan(m.value) else m.value]

    return {"history": {k: sorted(point(m) for m in store.get_metric_history(run_id, k)) for k in keys},
            "latest": {m.key: point(m) for m in store.get_run(run_id).data._metric_objs}}


def new_run(store, name):
    exp = store.create_experiment(f"store-check-{name}-{random.randrange(1 << 30)}")
    return store.create_run(exp, "store-check", 0, [], name).info.run_id


def main():
    stock, light = SqlAlchemyStore(URI, "s3://unused/a"), stack_store.build(URI, "s3://unused/a")
    assert type(light).__name__ == "StackSqlStore"
    # Which way each call of the stack's store went: COPY, or MLflow's own path after a
    # resent point made the COPY fail.
    ways = {"copy": 0, "mlflow": 0}
    copy, own = stack_store._copy_to_postgresql, SqlAlchemyStore._log_metrics_once

    def counted_copy(*args):
        done = copy(*args)
        ways["copy"] += done
        return done

    def counted_own(self, *args):
        ways["mlflow"] += self is light
        return own(self, *args)

    stack_store._copy_to_postgresql, SqlAlchemyStore._log_metrics_once = counted_copy, counted_own
    rng = random.Random(11)
    # Every character MLflow allows in a key but letters and digits, and a final newline
    # (its name check lets one through), as COPY's text format must carry them.
    keys = ["loss", "acc", "lr", "t", "val/loss x:1.ü-_", "loss\n"]
    # Values no short decimal writes exactly, the smallest and near the largest double, -0.
    values = [0.0, 1.5, -2.0, float("nan"), float("inf"), float("-inf"), 3.25, 0.1, 1 / 3, 5e-324, -0.0, 1e300]
    runs = {"stock": new_run(stock, "stock"), "light": new_run(light, "light")}
    sent = []
    for _ in range(60):
        batch = [Metric(rng.choice(keys), rng.choice(values), 1_700_000_000_000 + rng.randrange(5),
                        rng.randrange(-3, 3)) for _ in range(rng.randrange(1, 40))]
        if sent and rng.random() < 0.3:
            batch.append(rng.choice(sent))
        sent += batch
        stock.log_batch(runs["stock"], batch, [], [])
        light.log_batch(runs["light"], batch, [], [])
    same = state(stock, runs["stock"], keys) == state(light, runs["light"], keys)

    # Two writers at once on one run and the same keys, so the same latest_metrics rows
    # (their points differ: a point sent twice at the same instant is a race in MLflow's
    # own fallback too).
    shared = [Metric(k, float(i % 7), i, i % 13) for i in range(400) for k in ("c", "d")]
    together, errors = new_run(light, "concurrent"), []

    def writer(offset):
        mine = [m for m in shared if m.timestamp % 2 == offset]  # both keys each, on the same rows
        try:
            for start in range(0, len(mine), 50):
                light.log_batch(together, mine[start:start + 50], [], [])
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = new_run(stock, "reference")
    stock.log_batch(reference, shared, [], [])
    concurrent_same = state(light, together, ["c", "d"]) == state(stock, reference, ["c", "d"])
    print(json.dumps({"same": same, "points": len(sent), "concurrent_same": concurrent_same, "errors": errors,
                      "ways": ways}))


main()
