"""Optional OpenTelemetry tracing: one span per proxied request, with the GenAI semantic conventions.

Off by default, and then nothing here is even imported on the request path. On (`--otlp-endpoint`,
the `tracing` extra installed from this repository), spans go out in batches from the SDK's exporter thread, and
the W3C `traceparent` of each span is sent to the engine so that its own spans join the trace.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("llm_gateway.tracing")

# The GenAI operation of each proxied path (gen_ai.operation.name).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
}


class RequestTracer:
    """Starts and ends request spans; built only when tracing is on."""

    def __init__(self, endpoint: str, service_name: str = "llm-gateway") -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self._tracer = self._provider.get_tracer("llm_gateway")
        self._propagator = TraceContextTextMapPropagator()
        log.info("tracing on: spans exported to %s", url)

    def start(self, path: str, model: str, headers: list[tuple[bytes, bytes]]) -> Any:
        """A span for the request, continuing the client's trace when it sent a `traceparent`."""
        from opentelemetry.trace import SpanKind

        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        operation = OPERATIONS.get(path, path.rsplit("/", 1)[-1])
        span = self._tracer.start_span(
            f"{operation} {model}",
            context=self._propagator.extract(carrier) if carrier else None,
            kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": model, "url.path": path},
        )
        return span

    def traceparent(self, span: Any) -> str:
        context = span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    def end(self, span: Any, attributes: dict[str, Any], error: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()  # flushes what is still batched
