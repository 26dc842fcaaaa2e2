"""OpenTelemetry spans for a prediction's stages, under the span Cog's server opens for the prediction.

Cog 0.23 installs a tracer provider in its worker when tracing is configured (`COG_TRACE_ENABLED`,
an OTLP endpoint in `OTEL_EXPORTER_OTLP_ENDPOINT`; docs/serving.md). Until then the global provider
is OpenTelemetry's proxy, and each function here returns before making anything: tracing off costs
one type check per stage. Span times are the host's wall clock; on a GPU a stage's span ends when its
kernels are queued, not when they finish (the prediction's `timings` metric has the GPU's own times).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

try:
    from opentelemetry import trace
except ImportError:  # an image without cog[tracing]'s packages: no spans
    trace = None

TRACER_NAME = "inpaint"


def enabled() -> bool:
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@contextmanager
def span(name: str) -> Iterator[None]:
    """A span named `name` around the block, child of the current one; nothing when tracing is off."""
    if not enabled():
        yield
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(name):
        yield


def record(name: str, start_ns: int, end_ns: int) -> None:
    """A span over a time already past (`time.time_ns()` values), child of the current one."""
    if enabled() and end_ns >= start_ns:
        trace.get_tracer(TRACER_NAME).start_span(name, start_time=start_ns).end(end_time=end_ns)
