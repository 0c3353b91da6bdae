"""MLflow 3's GenAI surface, as a team's client uses it, in its own process with only the
printed settings (test_genai.py).

    python genai_client.py OUT.json

A traced function with nested spans, feedback on its trace, a trace search, an
OpenTelemetry export (OTLP/HTTP protobuf, gzip) to /v1/traces with the login and without
one, a prompt registered and loaded back, and mlflow.genai.evaluate with a code scorer.
OUT.json says what each step saw; the test asserts on it.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
import uuid

import mlflow
import requests
from mlflow.genai.scorers import scorer


@mlflow.trace(name="retrieve", span_type="RETRIEVER")
def retrieve(question: str) -> list[str]:
    return [f"doc about {question}", "another doc"]


@mlflow.trace(name="answer", span_type="CHAIN")
def answer(question: str) -> str:
    docs = retrieve(question)
    with mlflow.start_span(name="generate", span_type="LLM") as span:
        span.set_inputs({"docs": docs})
        text = f"{question.upper()} ({len(docs)} docs)"
        span.set_outputs({"text": text})
    return text


def otlp_body(trace_id: bytes, span_id: bytes, name: str) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    now = time.time_ns()
    span = Span(trace_id=trace_id, span_id=span_id, name=name, kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=now - 5_000_000, end_time_unix_nano=now)
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="otel-e2e"))])
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource,
                                                                      scope_spans=[ScopeSpans(spans=[span])])])
    return request.SerializeToString()


def main(out_path: str) -> None:
    base = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    login = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    verify = os.environ["REQUESTS_CA_BUNDLE"]
    experiment = mlflow.set_experiment(f"genai-{uuid.uuid4().hex[:8]}")
    seen: dict = {"experiment_id": experiment.experiment_id}

    # A traced call with nested spans, then feedback on it.
    result = answer("what is mlflow")
    trace_id = mlflow.get_last_active_trace_id()
    # Traces are sent in the background: wait for this one to be stored before annotating it.
    mlflow.flush_trace_async_logging()
    mlflow.log_feedback(trace_id=trace_id, name="helpful", value=True, rationale="e2e")
    trace = mlflow.get_trace(trace_id)
    seen["answer"] = result
    seen["spans"] = sorted(s.name for s in trace.data.spans)
    seen["feedback"] = [(a.name, a.value) for a in trace.info.assessments if a.name == "helpful"]
    found = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
    seen["searched"] = [t.info.trace_id for t in found]
    seen["trace_id"] = trace_id

    # OpenTelemetry export, as an SDK or collector sends it: protobuf, gzip, the experiment header.
    otel_trace, otel_span = uuid.uuid4().bytes, uuid.uuid4().bytes[:8]
    body = gzip.compress(otlp_body(otel_trace, otel_span, "otel-span"))
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip",
               "x-mlflow-experiment-id": experiment.experiment_id}
    anonymous = requests.post(f"{base}/v1/traces", data=body, headers=headers, verify=verify, timeout=60)
    exported = requests.post(f"{base}/v1/traces", data=body, headers=headers, auth=login, verify=verify, timeout=60)
    seen["otlp"] = {"anonymous": anonymous.status_code, "with_login": exported.status_code}
    otel_id = "tr-" + otel_trace.hex()
    deadline = time.monotonic() + 30
    seen["otel_spans"] = []
    while time.monotonic() < deadline:
        try:
            seen["otel_spans"] = [s.name for s in mlflow.get_trace(otel_id).data.spans]
            break
        except Exception:  # noqa: BLE001 - not stored yet
            time.sleep(1)

    # The prompt registry.
    name = f"summarize_{uuid.uuid4().hex[:6]}"
    mlflow.genai.register_prompt(name=name, template="Summarize: {{text}}", commit_message="e2e")
    loaded = mlflow.genai.load_prompt(f"prompts:/{name}/1")
    seen["prompt"] = loaded.format(text="the stack")

    # Evaluation with a code scorer.
    @scorer
    def mentions_docs(outputs) -> bool:
        return "docs" in str(outputs)

    evaluated = mlflow.genai.evaluate(data=[{"inputs": {"question": "a"}}, {"inputs": {"question": "b"}}],
                                      predict_fn=answer, scorers=[mentions_docs])
    mlflow.flush_trace_async_logging()
    seen["evaluation"] = {k: v for k, v in evaluated.metrics.items() if "mentions_docs" in k}
    seen["evaluation_run"] = evaluated.run_id
    with open(out_path, "w") as fh:
        json.dump(seen, fh)


if __name__ == "__main__":
    main(sys.argv[1])
