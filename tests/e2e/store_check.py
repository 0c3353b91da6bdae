"""Run inside the mlflow container (python3 - < store_check.py): the stack's tracking
store against MLflow's own on the stack's PostgreSQL. Prints one JSON line.

- The same random batches (duplicates, resent points, NaN, infinities, ties) to a
  run of each store: the metric history and the latest values must be equal.
- The stack's store took its COPY path, and MLflow's own after a resent point.
- Two threads sending batches to one run of the stack's store at once (the same
  keys, different points): no error, every point stored once, and the latest
  values as MLflow's own store leaves for the same points.
- Searches: the stack's two-step search and MLflow's own, on the same runs (with
  metrics, params and tags, some missing, ties in start time), page by page.
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
    searches = compare_searches(light, rng)
    print(json.dumps({"same": same, "points": len(sent), "concurrent_same": concurrent_same, "errors": errors,
                      "ways": ways, "searches": searches}))


def compare_searches(light, rng):
    """{query: [pages, runs]} where both searches agreed; raises where they did not."""
    from mlflow.entities import Param, RunTag, ViewType

    exp = light.create_experiment(f"store-check-search-{random.randrange(1 << 30)}")
    for n in range(45):
        run_id = light.create_run(exp, "check", 1000 + rng.randrange(15), [], f"r{n}").info.run_id
        light.log_batch(run_id, [Metric(k, rng.choice([0.1, 0.5, rng.random()]), 1, 0) for k in ("m0", "m1")
                                 if rng.random() < 0.85],
                        [Param(k, str(rng.randrange(9))) for k in ("p0", "p1") if rng.random() < 0.85],
                        [RunTag("team", rng.choice("ab"))] if rng.random() < 0.7 else [])
        if rng.random() < 0.1:
            light.delete_run(run_id)
    agreed = {}
    for filter_string, order_by in (("", []), ("metrics.m0 > 0.3", ["params.p0 DESC"]),
                                    ("params.p1 LIKE '1%' and tags.team = 'a'", ["metrics.m1 DESC"]),
                                    ("params.p0 IS NULL", ["attributes.run_name"])):
        for view in (ViewType.ACTIVE_ONLY, ViewType.ALL):
            # The stack's own path (not a fall-back to MLflow's, which would compare it with itself).
            assert light._page_of_run_ids([exp], filter_string, view, 4, order_by, None) is not None
            pages = {}
            for name, search in (("stack", light._search_runs),
                                 ("mlflow", lambda *a: SqlAlchemyStore._search_runs(light, *a))):
                got, token = [], None
                while True:
                    runs, token = search([exp], filter_string, view, 4, order_by, token)
                    got.append([(r.info.run_id, r.data.metrics, r.data.params, r.data.tags) for r in runs])
                    if not token:
                        break
                pages[name] = got
            assert pages["stack"] == pages["mlflow"], (filter_string, order_by, view)
            agreed[f"{filter_string} | {order_by} | {view}"] = [len(pages["stack"]), sum(map(len, pages["stack"]))]
    return agreed


main()
