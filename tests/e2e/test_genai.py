"""MLflow 3's GenAI features through the stack, at the root and under MLFLOW_BASE_PATH
(`target`), from a client process with only the printed settings (genai_client.py):
tracing with nested spans, feedback, trace search, an OTLP/HTTP export to /v1/traces
(401 without a login), the prompt registry and mlflow.genai.evaluate with a code scorer.
test_reachable_host.py runs the same client against two replicas."""

from __future__ import annotations

import json
from pathlib import Path


def run_genai_client(stack, tmp_path: Path) -> dict:
    out = tmp_path / "genai.json"
    stack.client(str(out), script="genai_client.py", timeout=600)
    return json.loads(out.read_text())


def assert_genai_works(seen: dict, stack) -> None:
    assert seen["answer"] == "WHAT IS MLFLOW (2 docs)"
    assert seen["spans"] == ["answer", "generate", "retrieve"], seen["spans"]
    assert seen["feedback"] == [["helpful", True]], seen["feedback"]
    assert seen["trace_id"] in seen["searched"], seen
    assert seen["otlp"] == {"anonymous": 401, "with_login": 200}, seen["otlp"]
    assert seen["otel_spans"] == ["otel-span"], seen
    assert seen["prompt"] == "Summarize: the stack"
    assert seen["evaluation"] == {"mentions_docs/mean": 1.0}, seen["evaluation"]
    # In PostgreSQL: the traces of the experiment (the traced call, the OTLP export, the
    # evaluation's two) and the feedback on the first.
    experiment = seen["experiment_id"]
    traces = int(stack.psql(f"SELECT count(*) FROM trace_info WHERE experiment_id = {experiment}"))
    assert traces >= 4, traces
    feedback = stack.psql(f"SELECT count(*) FROM assessments WHERE trace_id = '{seen['trace_id']}' "
                          "AND name = 'helpful'")
    assert feedback == "1", feedback


def test_tracing_feedback_otlp_prompts_and_evaluation(target, tmp_path):
    assert_genai_works(run_genai_client(target, tmp_path), target)
