"""Searching many runs: seeds an experiment of N runs (10 metrics and 10 params each) straight
into the stack's PostgreSQL, through MLflow's own tables, then times `search_runs` through the
stack as a client does, and shows where the database spends the time. Prints figures, asserts
nothing; removes what it seeded unless told to keep it.

    eval "$(./show_all.sh --client-env)" && .venv/bin/python bench/search.py [--runs 100000] [--queries 30]

The seed takes about a minute per 100,000 runs on 2 cores (logging them through the API would
take an hour). The stack's own PostgreSQL only (Compose): with POSTGRES_HOST or on a swarm, seed
another way. The runs are FINISHED runs of one new experiment, named search-bench-<time>;
their metric values are uniform in [0, 1), their params whole numbers below 1000 (as text).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

# The project's own modules (stack/: .env and the Compose project).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = """
\\set ON_ERROR_STOP on
SELECT setseed(0.42);
BEGIN;
INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time,
                  end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)
SELECT md5(:exp || '-' || i), 'run-' || i, 'LOCAL', 'bench/search.py', '', 'bench', 'FINISHED',
       1700000000000 + i * 1000, 1700000000500 + i * 1000, '', 'active',
       :'root' || '/' || md5(:exp || '-' || i) || '/artifacts', :exp
FROM generate_series(1, :runs) i;
CREATE TEMP TABLE seeded AS SELECT run_uuid FROM runs WHERE experiment_id = :exp;
INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)
SELECT 'm' || k, random(), 1700000000000, run_uuid, 0, false FROM seeded, generate_series(0, 9) k;
INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
SELECT m.key, m.value, m.timestamp, m.step, m.is_nan, m.run_uuid FROM metrics m JOIN seeded USING (run_uuid);
INSERT INTO params (key, value, run_uuid)
SELECT 'p' || k, floor(random() * 1000)::int::text, run_uuid FROM seeded, generate_series(0, 9) k;
INSERT INTO tags (key, value, run_uuid) SELECT 'mlflow.runName', 'run', run_uuid FROM seeded;
COMMIT;
ANALYZE runs; ANALYZE metrics; ANALYZE latest_metrics; ANALYZE params; ANALYZE tags;
"""

# Every row the seed made (the experiment itself is MLflow's to delete: the API).
UNSEED = """
\\set ON_ERROR_STOP on
BEGIN;
CREATE TEMP TABLE seeded AS SELECT run_uuid FROM runs WHERE experiment_id = :exp;
DELETE FROM metrics WHERE run_uuid IN (SELECT run_uuid FROM seeded);
DELETE FROM latest_metrics WHERE run_uuid IN (SELECT run_uuid FROM seeded);
DELETE FROM params WHERE run_uuid IN (SELECT run_uuid FROM seeded);
DELETE FROM tags WHERE run_uuid IN (SELECT run_uuid FROM seeded);
DELETE FROM runs WHERE run_uuid IN (SELECT run_uuid FROM seeded);
COMMIT;
"""

QUERIES = {
    "filter on a metric, order by a param": ("metrics.m0 > 0.5", ["params.p0 DESC"]),
    "filter on a param, order by a metric": ("params.p1 LIKE '1%'", ["metrics.m1 DESC"]),
    "no filter, newest first": ("", []),
}


def psql(sql: str, variables: dict[str, str], tuples: bool = False) -> str:
    from stack import compose

    argv, environ = compose.invocation()
    values = compose.values_for_compose(environ)
    if values.get("POSTGRES_HOST"):
        raise SystemExit("search.py seeds the stack's own PostgreSQL; with POSTGRES_HOST, seed the runs another way")
    flags = [f"--set={k}={v}" for k, v in variables.items()]
    command = ["psql", "-q", "-X", "-U", values["POSTGRES_USER"], "-d", values["POSTGRES_DB"],
               *(["-At"] if tuples else []), *flags]
    result = subprocess.run([*argv, "exec", "-T", "db", *command], input=sql, capture_output=True, text=True,
                            env=environ, check=False)
    if result.returncode != 0:
        raise SystemExit(f"psql failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def archive_lag() -> int:
    """WAL segments the point-in-time archive has yet to take (0 without one)."""
    # A segment's number from its file name (timeline, log, segment: 8 hex digits each; 256
    # segments of 16 MiB per log).
    number = "(('x' || substr({0}, 9, 8))::bit(32)::bigint * 256 + ('x' || substr({0}, 17, 8))::bit(32)::bigint)"
    out = psql(f"SELECT CASE WHEN current_setting('archive_mode') = 'off' OR last_archived_wal IS NULL THEN 0 "
               f"ELSE greatest(0, {number.format('pg_walfile_name(pg_current_wal_lsn())')} "
               f"- {number.format('last_archived_wal')} - 1) END FROM pg_stat_archiver;", {}, tuples=True)
    return int(out.strip() or 0)


def wait_for_the_archive(limit: float = 1800) -> None:
    """The seed wrote ~1 GiB of WAL per 100,000 runs; the archive compresses and uploads
    it for minutes, on the same cores the searches need: timed only once it has caught up."""
    started, lag = time.monotonic(), archive_lag()
    while lag > 0 and time.monotonic() - started < limit:
        print(f"  waiting for the point-in-time archive to take the seed's WAL: {lag} segments to go", flush=True)
        time.sleep(10)
        lag = archive_lag()
    if lag > 0:
        print(f"  the archive is still {lag} segments behind: the figures below ran beside it", flush=True)
    elif time.monotonic() - started > 1:
        print(f"  the archive took the seed's WAL in {time.monotonic() - started:.0f} s", flush=True)


def timed_searches(client: MlflowClient, experiment: str, queries: int) -> dict[str, dict]:
    figures = {}
    for name, (filter_string, order_by) in QUERIES.items():
        client.search_runs([experiment], filter_string, max_results=100, order_by=order_by)  # warm
        took, found = [], 0
        for _ in range(queries):
            started = time.perf_counter()
            found = len(client.search_runs([experiment], filter_string, max_results=100, order_by=order_by))
            took.append((time.perf_counter() - started) * 1000)
        took.sort()
        figures[name] = {"p50": statistics.median(took), "p95": took[max(0, round(len(took) * 0.95) - 1)],
                         "found": found}
    return figures


def database_share(experiment: str) -> str:
    """EXPLAIN ANALYZE of the first query's main statement as MLflow 3.17 builds it for
    PostgreSQL (`SqlAlchemyStore._search_runs`), summarised: its total and its sort. (The
    stack's store runs a narrower one: mlflow/stack_store.py.)"""
    statement = f"""
    SELECT DISTINCT runs.*, CASE WHEN (anon_1.value IS NULL) THEN 1 ELSE 0 END AS clause_1, anon_1.value
    FROM runs JOIN (SELECT run_uuid FROM latest_metrics WHERE key = 'm0' AND value > 0.5 AND is_nan = false) AS anon_2
      ON runs.run_uuid = anon_2.run_uuid
    LEFT OUTER JOIN (SELECT value, run_uuid FROM params WHERE key = 'p0') AS anon_1 ON runs.run_uuid = anon_1.run_uuid
    WHERE runs.experiment_id IN ({int(experiment)}) AND runs.lifecycle_stage IN ('active')
    ORDER BY clause_1, anon_1.value DESC, runs.start_time DESC, runs.run_uuid LIMIT 101 OFFSET 0;"""
    plan = psql("EXPLAIN (ANALYZE) " + statement, {})
    total = re.search(r"Execution Time: ([\d.]+) ms", plan)
    sorts = [float(t) for t in re.findall(r"->  Sort .*?actual time=[\d.]+\.\.([\d.]+)", plan)]
    methods = sorted(set(re.findall(r"Sort Method: ([a-z -]+)", plan)))
    return (f"  MLflow's own main statement in PostgreSQL: {float(total.group(1)):.0f} ms, "
            f"of which sorting every match (DISTINCT: no top-N) up to {max(sorts, default=0):.0f} ms "
            f"({', '.join(m.strip() for m in methods)}); the stack's store finds the page's ids first")


def report(client: MlflowClient, experiment: str, queries: int) -> None:
    figures = timed_searches(client, experiment, queries)
    print(f"search_runs through the stack, max_results=100, {queries} timed calls each:")
    for query, row in figures.items():
        print(f"  {query:40} p50 {row['p50']:6.0f} ms  p95 {row['p95']:6.0f} ms  ({row['found']} runs returned)")
    print(database_share(experiment))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=30, help="timed searches of each kind")
    parser.add_argument("--keep", action="store_true", help="keep the seeded experiment")
    parser.add_argument("--experiment", help="time the searches on this experiment (an id, e.g. one seeded with "
                        "--keep), without seeding")
    args = parser.parse_args()
    if args.runs < 1 or args.queries < 1:
        parser.error("--runs and --queries must be at least 1")
    client = MlflowClient()
    if args.experiment:
        report(client, args.experiment, args.queries)
        return 0
    name = f"search-bench-{int(time.time() * 1000)}"
    experiment = client.create_experiment(name)
    root = client.get_experiment(experiment).artifact_location
    try:
        started = time.monotonic()
        psql(SEED, {"exp": experiment, "runs": str(args.runs), "root": root})
        print(f"seeded {args.runs:,} runs (10 metrics, 10 params each) into experiment {experiment} ({name}) "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        wait_for_the_archive()
        report(client, experiment, args.queries)
    finally:
        if not args.keep:
            psql(UNSEED, {"exp": experiment})
            client.delete_experiment(experiment)
            print(f"removed the seeded runs; experiment {experiment} is deleted (./stack_gc.sh purges it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
