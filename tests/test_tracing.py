"""OpenTelemetry tracing: a span per request exported over OTLP/HTTP to an in-process collector."""

from __future__ import annotations

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.background_server import BackgroundServer
from tests.recording_engine import RecordingEngine
from tests.routes import write_routing_map
from tests.support import RunningProcess
from tests.web import post, wait_for

CHAT = "/v1/chat/completions"


class OtlpCollector:
    """Receives OTLP/HTTP protobuf exports, as an OpenTelemetry Collector's otlphttp receiver does."""

    def __init__(self) -> None:
        self.spans: list = []

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def start(self) -> OtlpCollector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._server = BackgroundServer(app).start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def traced(module_processes, tmp_path_factory) -> tuple[RunningProcess, OtlpCollector, RecordingEngine]:
    collector, engine = module_processes.add(OtlpCollector().start()), module_processes.recording_engine()
    config = write_routing_map(
        tmp_path_factory.mktemp("trace") / "routes.yaml",
        [{"name": "rec", "model": "org/m", "owned_by": "vllm", "url": engine.url}],
    )
    gateway = module_processes.gateway(
        config, extra_args=["--otlp-endpoint", collector.url], env={"OTEL_BSP_SCHEDULE_DELAY": "100"}
    )
    return gateway, collector, engine


def attributes(span) -> dict:
    values = {}
    for item in span.attributes:
        value = item.value
        values[item.key] = value.string_value or value.int_value or value.bool_value
    return values


def test_span_with_genai_attributes_and_traceparent_to_the_engine(traced):
    gateway, collector, engine = traced
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    post(
        gateway.url + CHAT,
        {"model": "org/m", "messages": []},
        headers={"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"},
    )
    wait_for(lambda: collector.spans, timeout=10, message="a span exported")
    span = collector.spans[-1]
    assert span.name == "chat org/m"
    assert span.trace_id.hex() == client_trace  # the client's trace continues through the gateway
    found = attributes(span)
    assert found["gen_ai.operation.name"] == "chat"
    assert found["gen_ai.request.model"] == "org/m" and found["gen_ai.response.model"] == "org/m"
    assert found["gen_ai.usage.input_tokens"] == 3 and found["gen_ai.usage.output_tokens"] == 4
    assert found["http.response.status_code"] == 200 and found["llm_gateway.engine"] == "rec"
    sent = {k.lower(): v for k, v in engine.received[-1].headers.items()}["traceparent"]
    assert sent.split("-")[1] == client_trace and sent.split("-")[2] == span.span_id.hex()
