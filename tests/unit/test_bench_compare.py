"""The comparison table (bench/bench_compare.py): which figures each ratio comes from."""

import sys

from stack.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_compare  # noqa: E402  (bench/ is not a package)

RAW = bench_compare.RAW


def test_the_artifact_ratio_is_the_median_of_the_pairs_not_a_ratio_of_medians():
    rows = [
        ("log_metric, 1 thread: req/s", 20.0, 100.0),
        ("log_metric, 1 thread: p50 ms", 50.0, 10.0),
        ("artifact 100 MiB down: MiB/s", 200.0, 250.0),
        (f"{RAW} 100 MiB down: MiB/s", float("nan"), 300.0),
        (f"artifact 100 MiB down / {RAW}, paired", float("nan"), 0.9),
    ]
    lines = bench_compare.table(rows, [100]).splitlines()
    assert "| log_metric, 1 thread: req/s | 20.0 | 100.0 | 5.00 |" in lines
    assert "| log_metric, 1 thread: p50 ms | 50.0 | 10.0 | 5.00 |" in lines  # lower is better
    assert "| artifact 100 MiB down: MiB/s | 200.0 | 250.0 | 1.25 |" in lines
    # 250 / 300 would be 0.83: the table shows the median of the paired ratios.
    assert "| artifact 100 MiB down through MLflow / boto3 to the S3 port | | 250.0 / 300.0 | 0.90 |" in lines
    # Neither boto3's own row nor the pairs' row is a measure of its own against the plain server.
    assert not [line for line in lines if line.startswith((f"| {RAW}", "| artifact 100 MiB down / "))]
    assert len(lines) == 2 + 3 + 1
