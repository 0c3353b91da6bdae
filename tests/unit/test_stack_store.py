"""The stack's tracking store (mlflow/stack_store.py) against MLflow's own, on
SQLite: the same calls leave the same metric history and the same latest
values, duplicates, NaN, infinities and out-of-order steps included."""

import importlib.util
import math
import random
import sys

import pytest
from mlflow.entities import Metric

from stack.paths import ROOT

_spec = importlib.util.spec_from_file_location("stack_store", ROOT / "mlflow" / "stack_store.py")
ss = importlib.util.module_from_spec(_spec)
sys.modules["stack_store"] = ss
_spec.loader.exec_module(ss)


@pytest.fixture
def stores(tmp_path):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    stock = SqlAlchemyStore(f"sqlite:///{tmp_path / 'stock.db'}", str(tmp_path / "a"))
    light = ss.build(f"sqlite:///{tmp_path / 'light.db'}", str(tmp_path / "b"))
    assert type(light) is ss.store_class()
    yield stock, light
    stock.engine.dispose()
    light.engine.dispose()


def _runs(stock, light):
    ids = []
    for store in (stock, light):
        exp = store.create_experiment("e")
        ids.append(store.create_run(exp, "u", 0, [], "r").info.run_id)
    return ids


def _state(store, run_id, keys):
    def point(m):
        return m.step, m.timestamp, math.isnan(m.value), 0.0 if math.isnan(m.value) else m.value

    history = {k: sorted(point(m) for m in store.get_metric_history(run_id, k)) for k in keys}
    latest = {m.key: point(m) for m in store.get_run(run_id).data._metric_objs}
    return history, latest


def test_random_batches_leave_what_mlflow_leaves(stores):
    stock, light = stores
    rng = random.Random(7)
    keys = ["loss", "acc", "lr"]
    values = [0.0, 1.5, -2.0, float("nan"), float("inf"), float("-inf"), 3.25]
    stock_run, light_run = _runs(stock, light)
    sent = []
    for _ in range(40):
        batch = [Metric(rng.choice(keys), rng.choice(values), rng.randrange(5), rng.randrange(6))
                 for _ in range(rng.randrange(1, 30))]
        if sent and rng.random() < 0.3:  # a resent point, as a retried request carries
            batch.append(rng.choice(sent))
        sent += batch
        stock.log_batch(stock_run, batch, [], [])
        light.log_batch(light_run, batch, [], [])
    assert _state(stock, stock_run, keys) == _state(light, light_run, keys)


def test_single_calls_and_a_repeated_point_are_stored_once(stores):
    stock, light = stores
    stock_run, light_run = _runs(stock, light)
    for store, run in ((stock, stock_run), (light, light_run)):
        for m in [Metric("m", 1.0, 10, 2), Metric("m", 1.0, 10, 2), Metric("m", 5.0, 9, 2), Metric("m", 0.5, 11, 1)]:
            store.log_metric(run, m)
    assert _state(stock, stock_run, ["m"]) == _state(light, light_run, ["m"])
    assert len(light.get_metric_history(light_run, "m")) == 3
    # Step first, then timestamp: (2, 10, 1.0) beats (2, 9, 5.0) and (1, 11, 0.5).
    assert light.get_run(light_run).data.metrics["m"] == 1.0


def test_more_rows_than_one_api_call_carries(stores):
    _, light = stores
    _, run = _runs(*stores)
    # An API call carries at most 1000 points; the store's own method takes any number.
    light._log_metrics(run, [Metric("k", float(i), 1, i) for i in range(2507)])
    assert len(light.get_metric_history(run, "k")) == 2507
    assert light.get_run(run).data.metrics["k"] == 2506.0


def test_a_deleted_run_refuses_metrics_as_mlflow_does(stores):
    from mlflow.exceptions import MlflowException

    _, light = stores
    _, run = _runs(*stores)
    light.delete_run(run)
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        light.log_metric(run, Metric("m", 1.0, 1, 1))
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        light.log_batch(run, [Metric("m", 2.0, 1, 1)], [], [])


def test_mlflow_registers_it_for_postgresql_through_the_images_entry_point(tmp_path):
    """As in the image: the dist-info in app-meta and the module side by side on the path.
    MLflow loads entry points while its tracking package initialises: a module-level
    MLflow import there is a circular import, and MLflow falls back with a mere warning."""
    import shutil
    import subprocess

    shutil.copytree(ROOT / "mlflow" / "app-meta", tmp_path, dirs_exist_ok=True)
    shutil.copy(ROOT / "mlflow" / "stack_store.py", tmp_path)
    code = ("import warnings; warnings.simplefilter('error');"
            "from mlflow.tracking._tracking_service.utils import _tracking_store_registry as r;"
            "b = r._registry['postgresql']; print(b.__module__, b.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["stack_store", "build"], result.stdout + result.stderr[-2000:]


def test_ties_go_to_the_first_point_sent_as_in_mlflow(stores):
    """NaN is stored as 0 with is_nan: (step, timestamp, value) tie with a real 0.0."""
    stock, light = stores
    stock_run, light_run = _runs(stock, light)
    for order in ([Metric("t", float("nan"), 5, 1), Metric("t", 0.0, 5, 1)],
                  [Metric("u", 0.0, 5, 1), Metric("u", float("nan"), 5, 1)]):
        stock.log_batch(stock_run, order, [], [])
        light.log_batch(light_run, order, [], [])
    assert _state(stock, stock_run, ["t", "u"]) == _state(light, light_run, ["t", "u"])
    assert math.isnan(light.get_run(light_run).data.metrics["t"])
    assert light.get_run(light_run).data.metrics["u"] == 0.0


def test_copy_text_escapes_what_copy_reads_specially_and_leaves_odd_types_to_the_insert():
    row = {"key": "a\tb\\c\nd\re", "value": 1.7976931348623157e308, "timestamp": 3, "step": -4,
           "run_uuid": "r1", "is_nan": False}
    assert ss.copy_lines([row]) == "a\\tb\\\\c\\nd\\re\t1.7976931348623157e+308\t3\tr1\t-4\tf\n"
    # An int value is written as the float PostgreSQL stores; NaN rows arrive as 0 with is_nan.
    assert ss.copy_lines([{**row, "key": "k", "value": 7, "is_nan": True}]) == "k\t7.0\t3\tr1\t-4\tt\n"
    assert ss.copy_lines([{**row, "key": "k", "value": 0.1}]).split("\t")[1] == "0.1"
    # Types the driver binds differently (PostgreSQL rounds a float step; a bool is no number
    # here): the whole call takes the INSERT instead.
    for odd in ({"step": 4.0}, {"timestamp": 3.5}, {"value": True}, {"value": "1.5"}):
        assert ss.copy_lines([row, {**row, **odd}]) is None, odd


def _seeded(store, rng_seed: int) -> str:
    """An experiment of 60 runs with metrics, params and tags, some missing, start times with
    ties, a few runs deleted: the same in every store it is made in (by run name)."""
    from mlflow.entities import Param, RunTag

    rng = random.Random(rng_seed)
    exp = store.create_experiment("search")
    for n in range(60):
        run = store.create_run(exp, "u", 1000 + rng.randrange(20), [RunTag("mlflow.runName", f"r{n:02d}")], f"r{n:02d}")
        run_id = run.info.run_id
        metrics = [Metric(k, rng.choice([0.1, 0.5, 0.9, rng.random()]), 1, 0) for k in ("m0", "m1") if rng.random() < 0.85]
        params = [Param(k, str(rng.randrange(12))) for k in ("p0", "p1") if rng.random() < 0.85]
        tags = [RunTag("team", rng.choice(["a", "b"]))] if rng.random() < 0.7 else []
        store.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        if rng.random() < 0.1:
            store.delete_run(run_id)
    return exp


@pytest.fixture(scope="module")
def searchable(tmp_path_factory):
    """The stack's store (SQLite) with a seeded experiment, for the searches that read it."""
    path = tmp_path_factory.mktemp("search")
    light = ss.build(f"sqlite:///{path / 'light.db'}", str(path / "a"))
    yield light, _seeded(light, 11)
    light.engine.dispose()


def _pages(search, exp, filter_string, order_by, max_results, view):
    names, token, pages = [], None, 0
    while True:
        runs, token = search([exp], filter_string, view, max_results, order_by, token)
        pages += 1
        names += [(r.info.run_id, r.info.run_name, r.info.lifecycle_stage, r.data.metrics, r.data.params, r.data.tags,
                   r.inputs.dataset_inputs, r.outputs.model_outputs) for r in runs]
        if not token:
            return names, pages


@pytest.mark.parametrize("filter_string,order_by", [
    ("", []),
    ("metrics.m0 > 0.3", ["params.p0 DESC"]),
    ("params.p1 LIKE '1%'", ["metrics.m1 DESC", "attributes.start_time ASC"]),
    ("tags.team = 'a' and metrics.m1 <= 0.5", ["params.p1", "metrics.m0 DESC"]),
    ("attributes.run_name LIKE 'r1%'", ["tags.team DESC"]),
    ("params.p0 IS NULL", []),
    ("params.p0 != '3'", ["attributes.run_name DESC"]),
])
@pytest.mark.parametrize("max_results", [1, 7, 100])
def test_searches_return_what_mlflows_own_returns_page_by_page(searchable, filter_string, order_by, max_results):
    """The stack's two-step search (ids first) against MLflow's own on the same runs (ties in
    the order are broken by run id, so the same store): the same runs, in the same order, with
    the same data, over the same pages; deleted runs too."""
    from mlflow.entities import ViewType
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    light, exp = searchable

    def mlflows_own(*args):
        return SqlAlchemyStore._search_runs(light, *args)

    for view in (ViewType.ACTIVE_ONLY, ViewType.ALL, ViewType.DELETED_ONLY):
        # The stack's own path, not a fall-back to MLflow's (which would compare MLflow with itself).
        assert light._page_of_run_ids([exp], filter_string, view, max_results, order_by, None) is not None
        expected = _pages(mlflows_own, exp, filter_string, order_by, max_results, view)
        assert _pages(light._search_runs, exp, filter_string, order_by, max_results, view) == expected
        assert expected[0] or view == ViewType.DELETED_ONLY, "the search found nothing: not a comparison"


def test_a_join_that_could_repeat_a_run_is_mlflows_own_search(searchable):
    """The ids go without DISTINCT only where every joined subquery holds a run at most once:
    latest_metrics, params or tags on one key (their primary key is (key, run_uuid))."""
    from mlflow.entities import ViewType
    from mlflow.store.tracking.dbmodels.models import SqlMetric, SqlParam, SqlTag
    from sqlalchemy import select

    light, exp = searchable
    assert ss.one_row_per_run(select(SqlParam).where(SqlParam.key == "p0").subquery())
    assert ss.one_row_per_run(select(SqlTag).where(SqlTag.key == "team", SqlTag.value == "a").subquery())
    assert not ss.one_row_per_run(select(SqlTag).where(SqlTag.value == "a").subquery())  # any key
    assert not ss.one_row_per_run(select(SqlTag).where((SqlTag.key == "a") | (SqlTag.key == "b")).subquery())
    assert not ss.one_row_per_run(select(SqlMetric).where(SqlMetric.key == "m0").subquery())  # every point
    assert light._page_of_run_ids([exp], "metrics.m0 > 0.3", ViewType.ALL, 10, ["params.p0"], None) is not None


def test_a_dataset_filter_or_no_page_size_is_mlflows_own_search(searchable):
    from mlflow.entities import ViewType

    light, exp = searchable
    assert light._page_of_run_ids([exp], "datasets.name = 'x'", ViewType.ACTIVE_ONLY, 10, [], None) is None
    assert light._page_of_run_ids([exp], "", ViewType.ACTIVE_ONLY, None, [], None) is None
    ids, offset = light._page_of_run_ids([exp], "", ViewType.ACTIVE_ONLY, 10, [], None)
    assert len(ids) == 11 and offset == 0
