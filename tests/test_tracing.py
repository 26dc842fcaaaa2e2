"""Each prediction stage is an OpenTelemetry span under Cog's own prediction span, exported over OTLP/HTTP
by Cog's worker when tracing is on; with it off, no span is made."""

from __future__ import annotations

import gzip
import secrets
import time
from contextlib import closing

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from cogserver import CogServer, data_uri
from conftest import PREDICT_DEFAULTS, LoopbackReceiver, make_mask, make_photo
from inpaint import tracing
from inpaint.inputs import check_inputs

STAGES = ("decode", "text_encode", "denoise", "vae_decode", "safety", "encode")


class OtlpReceiver(LoopbackReceiver):
    """An OTLP/HTTP trace endpoint on loopback (opentelemetry-proto's ExportTraceServiceRequest, binary
    protobuf, as the OTLP specification's HTTP transport defines it), collecting every span it is sent.
    Its url is the base the exporters add /v1/traces to."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        super().__init__()

    def take(self, body: bytes, request) -> None:
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(), "scope": scope_spans.scope.name,
                        "service": service, "path": request.path,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                    })

    def reply(self) -> tuple[bytes, str]:
        return ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"

    def wait_for(self, predicate, timeout: float = 30.0) -> list[dict]:
        with self.arrived:
            self.arrived.wait_for(lambda: predicate(self.spans), timeout)
            return list(self.spans)


@pytest.fixture
def receiver():
    with closing(OtlpReceiver()) as running:
        yield running


def _chain(spans: list[dict], trace_id: str, name: str, root: str) -> list[str] | None:
    """The names of the spans from stage `name` up to the span `root`, or None while that chain is incomplete."""
    by_id = {span["id"]: span for span in spans if span["trace"] == trace_id}
    stage = next((span for span in by_id.values() if span["name"] == name and span["scope"] == tracing.TRACER_NAME), None)
    chain, parent = [], stage and stage["parent"]
    while parent in by_id:
        chain.append(by_id[parent]["name"])
        parent = by_id[parent]["parent"]
    return chain if stage and parent == root else None


@pytest.mark.slow
def test_each_stage_is_a_span_under_the_servers_prediction_span(tiny_weights, tmp_path, receiver):
    # Tracing on, as docs/serving.md says: COG_TRACE_CONFIGURED and an OTLP endpoint (spans sent every 0.1 s).
    env = {"COG_TRACE_CONFIGURED": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    body = {"image": data_uri(photo), "mask": data_uri(mask), "width": 64, "height": 64, "num_inference_steps": 2}
    with CogServer(tiny_weights, log_path=tmp_path / "server.log", env=env) as server:
        # A traced caller (a gateway, a client) sends W3C trace context; sampled (flags 01).
        status, response = server.predict(body, headers={"traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert response["status"] == "succeeded"
        spans = receiver.wait_for(lambda spans: all(_chain(spans, trace_id, name, caller_span) for name in STAGES))
    stage_spans = {span["name"]: span for span in spans
                   if span["trace"] == trace_id and span["scope"] == tracing.TRACER_NAME}
    assert set(STAGES) <= set(stage_spans), sorted(stage_spans)
    for name in STAGES:
        span = stage_spans[name]
        assert span["path"] == "/v1/traces" and span["end"] >= span["start"] > 0
        # Up the parents to the caller's span: every stage hangs under the server's prediction span.
        chain = _chain(spans, trace_id, name, caller_span)
        assert chain and any(link.startswith("cog.prediction") for link in chain), (name, chain)
    # The stages follow each other in time.
    order = sorted(STAGES, key=lambda name: stage_spans[name]["start"])
    assert order.index("decode") < order.index("denoise") < order.index("vae_decode") < order.index("encode")


@pytest.fixture
def exporter(monkeypatch):
    """Tracing on in this process, as Cog's worker turns it on, with OpenTelemetry's SDK provider, its spans
    kept in memory. The global provider can be set only once, so the two calls tracing.py makes reach it
    through monkeypatch and are undone after the test."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider, kept = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.setattr(trace, "get_tracer", lambda name, *args, **kwargs: provider.get_tracer(name, *args, **kwargs))
    yield kept
    provider.shutdown()


def test_in_process_each_stage_is_a_span_under_the_callers_span_and_denoise_lies_between_its_neighbours(
        inpainter, tmp_path, exporter):
    from opentelemetry import trace

    assert tracing.enabled()
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    # A negative prompt: the text encoder runs twice (prompt, then negative), one span each.
    request = check_inputs(**dict(PREDICT_DEFAULTS, negative_prompt="blurry", mask_padding=16))
    with trace.get_tracer("caller").start_as_current_span("prediction") as caller:
        assert inpainter.inpaint(photo, mask, request, tmp_path).paths
    spans = exporter.get_finished_spans()
    root = caller.get_span_context()
    ours = [span for span in spans if span.instrumentation_scope.name == tracing.TRACER_NAME]
    everything = {*STAGES, "prepare", "queue", "vae_encode", "composite"}  # the service's and the model's stages
    assert {span.name for span in ours} == everything, sorted(span.name for span in ours)
    for span in ours:  # children of the caller's span, straight or through one of ours
        assert span.context.trace_id == root.trace_id and span.parent is not None, span.name
        assert span.parent.span_id in {root.span_id, *(other.context.span_id for other in ours)}, span.name
        assert 0 < span.start_time <= span.end_time, span.name
    named = {name: [span for span in ours if span.name == name] for name in {span.name for span in ours}}
    assert len(named["text_encode"]) == 2 and [len(named[name]) for name in ("denoise", "vae_decode")] == [1, 1]
    (denoise,), (decode,) = named["denoise"], named["vae_decode"]
    # The loop's span runs from the end of the last stage before it to the VAE decode's start.
    before = max(span.end_time for span in named["text_encode"] + named["vae_encode"])
    assert before <= denoise.start_time <= denoise.end_time <= decode.start_time
    # The request's own stages are in time order around the model's.
    first = {name: min(span.start_time for span in named[name]) for name in named}
    assert first["decode"] < first["queue"] < first["text_encode"] < denoise.start_time < first["vae_decode"]
    assert first["vae_decode"] < first["safety"] < first["encode"] and first["vae_decode"] < first["composite"]


def test_a_span_over_a_time_already_past_is_kept_only_when_it_ends_after_it_starts(exporter):
    tracing.record("forwards", 1_000, 2_000)
    tracing.record("an instant", 3_000, 3_000)
    tracing.record("backwards", 5_000, 4_000)
    kept = {span.name: (span.start_time, span.end_time) for span in exporter.get_finished_spans()}
    assert kept == {"forwards": (1_000, 2_000), "an instant": (3_000, 3_000)}


def test_with_tracing_off_no_span_is_made(inpainter, tmp_path, monkeypatch):
    from opentelemetry import trace

    assert not tracing.enabled()  # no provider installed: OpenTelemetry's proxy

    def no_tracer(*args, **kwargs):
        raise AssertionError("a tracer was asked for with tracing off")

    monkeypatch.setattr(trace, "get_tracer", no_tracer)
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    request = check_inputs(**dict(PREDICT_DEFAULTS, prompt="x", mask_blur=4, mask_padding=16, scheduler="DDIM"))
    started = time.monotonic()
    assert inpainter.inpaint(photo, mask, request, tmp_path).paths
    assert time.monotonic() - started < 60
