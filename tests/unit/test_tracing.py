"""connector/ops/tracing.py without servers: when tracing is on, the links a
batch gets (extraction, dedupe, cap), the span of a write, the errors at startup.

Spans are taken with the SDK's own in-memory exporter; the OTLP path against a
real collector is tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from connector._errors import ConfigError, PartialWriteError, RetryableError
from connector._message import Message
from connector.ops import tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
TP = f"00-{TRACE}-{SPAN}-01"


def traceparent(i: int, flags: str = "01") -> str:
    return f"00-{i + 1:032x}-{i + 1:016x}-{flags}"


def msg(headers: dict[str, str] | None = None, id: str | None = None) -> Message:
    return Message(b"x", "s", None, headers or {}, None, id)


@pytest.fixture(autouse=True)
def _off() -> Iterator[None]:
    tracing.shutdown()
    yield
    tracing.shutdown()


# ------------------------------------------------------------------ settings


def test_off_by_default() -> None:
    assert tracing.settings({}) is None
    assert tracing.configure({}) is None
    assert tracing.tracer() is None


@pytest.mark.parametrize("env", [
    {"OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
    {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
    {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "},
    {"OTEL_SERVICE_NAME": "bridge", "OTEL_RESOURCE_ATTRIBUTES": "a=b"},  # not a request
])
def test_these_leave_it_off(env: dict[str, str]) -> None:
    assert tracing.settings(env) is None


@pytest.mark.parametrize(("env", "exporters", "protocol"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ("otlp",), "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",),
     "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",), "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "console"}, ("console",), "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "OTLP, console,otlp"}, ("otlp", "console"), "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "otlp,none"}, ("otlp",), "http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("otlp",), "grpc"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ("otlp",), "http/protobuf"),
])
def test_these_turn_it_on(env: dict[str, str], exporters: tuple[str, ...],
                          protocol: str) -> None:
    wanted = tracing.settings(env)
    assert wanted is not None
    assert (wanted.exporters, wanted.protocol, wanted.max_links) == (exporters, protocol, 128)


@pytest.mark.parametrize(("env", "error"), [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "unknown exporter 'jaeger'"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "http/protobuf or grpc; found 'http/json'"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SPAN_LINK_COUNT_LIMIT": "many"},
     "OTEL_SPAN_LINK_COUNT_LIMIT"),
])
def test_values_it_cannot_honour_fail_at_startup(env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        tracing.configure(env)
    assert tracing.tracer() is None


def test_link_limit_from_the_standard_variable() -> None:
    wanted = tracing.settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SPAN_LINK_COUNT_LIMIT": "5"})
    assert wanted is not None and wanted.max_links == 5


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    with pytest.raises(ConfigError) as caught:
        tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    text = str(caught.value)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set" in text
    assert "pip install 'natsconn[otel]'" in text
    assert tracing.tracer() is None


def test_missing_grpc_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                        None)
    with pytest.raises(ConfigError, match=r"grpc .*natsconn\[otel\]"):
        tracing.configure({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


# --------------------------------------------------------------------- links


def test_a_link_per_message_context_with_its_tracestate() -> None:
    links, dropped = tracing.links_of([
        msg({"traceparent": TP, "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"},
            id="ORDERS:7"),
        msg({"traceparent": traceparent(1)}),
        msg(),  # no headers
        msg({"other": "x"}),  # headers without a context
    ])
    assert dropped == 0
    assert [(f"{li.context.trace_id:032x}", f"{li.context.span_id:016x}") for li in links] == [
        (TRACE, SPAN), (f"{2:032x}", f"{2:016x}")]
    first = links[0]
    assert first.context.is_remote and first.context.trace_flags.sampled
    assert dict(first.context.trace_state) == {"congo": "t61rcWkgMzE", "rojo": "00f067aa0ba902b7"}
    assert dict(first.attributes or {}) == {"messaging.message.id": "ORDERS:7"}
    assert not links[1].attributes


def test_header_names_in_any_case() -> None:
    links, _ = tracing.links_of([msg({"Traceparent": TP, "TraceState": "k=v"})])
    assert len(links) == 1
    assert f"{links[0].context.trace_id:032x}" == TRACE
    assert dict(links[0].context.trace_state) == {"k": "v"}


def test_unsampled_parents_are_linked_too() -> None:
    links, _ = tracing.links_of([msg({"traceparent": traceparent(3, "00")})])
    assert len(links) == 1 and not links[0].context.trace_flags.sampled


def test_dedupe() -> None:
    same = [msg({"traceparent": TP}, id=f"S:{i}") for i in range(500)]
    # the same span again, with other tracestate and in another header case
    same.append(msg({"Traceparent": TP, "tracestate": "a=b"}))
    links, dropped = tracing.links_of([*same, msg({"traceparent": traceparent(9)})])
    assert dropped == 0
    assert [f"{li.context.span_id:016x}" for li in links] == [SPAN, f"{10:016x}"]
    assert dict(links[0].attributes or {}) == {"messaging.message.id": "S:0"}  # the first


@pytest.mark.parametrize("bad", [
    "", "junk", f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}", f"00-{TRACE.upper()}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-01-extra",
])
def test_malformed_traceparent_is_ignored(bad: str) -> None:
    links, dropped = tracing.links_of([msg({"traceparent": bad}), msg({"traceparent": TP})])
    assert [f"{li.context.trace_id:032x}" for li in links] == [TRACE]
    assert dropped == 0


def test_cap() -> None:
    messages = [msg({"traceparent": traceparent(i)}) for i in range(200)]
    messages += messages[:50]  # repeats are neither links nor dropped
    links, dropped = tracing.links_of(messages)
    assert len(links) == tracing.MAX_LINKS == 128
    assert [li.context.span_id for li in links] == list(range(1, 129))  # message order
    assert dropped == 200 - 128
    links, dropped = tracing.links_of(messages, limit=3)
    assert (len(links), dropped) == (3, 197)
    assert tracing.links_of(messages, limit=0) == ([], 200)


# ----------------------------------------------------------------- the span


@pytest.fixture
def spans() -> Iterator[tuple[tracing.OtelWriteTracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracing.OtelWriteTracer(provider.get_tracer("test"), max_links=2), exporter
    provider.shutdown()


def test_the_span_of_a_write(spans: tuple[tracing.OtelWriteTracer, InMemorySpanExporter]) -> None:
    writer, exporter = spans
    batch = [msg({"traceparent": traceparent(i)}) for i in range(3)] + [msg()]
    writer.end(writer.begin("orders", "kafka", batch), None)
    (span,) = exporter.get_finished_spans()
    assert span.name == "natsconn write kafka"
    assert span.kind is SpanKind.CLIENT
    assert span.parent is None  # a root span: the messages are links, not parents
    assert dict(span.attributes or {}) == {
        "natsconn.pipeline": "orders", "natsconn.sink": "kafka",
        "messaging.operation.type": "send", "messaging.batch.message_count": 4,
        "natsconn.links.dropped": 1,
    }
    assert [li.context.span_id for li in span.links] == [1, 2]
    assert span.status.status_code is StatusCode.UNSET


def test_a_failed_write(spans: tuple[tracing.OtelWriteTracer, InMemorySpanExporter]) -> None:
    writer, exporter = spans
    writer.end(writer.begin("orders", "pg", [msg()]), ConnectionResetError("gone"))
    writer.end(writer.begin("orders", "pg", [msg()]), asyncio.CancelledError())
    failed, cancelled = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ConnectionResetError: gone"
    assert failed.attributes is not None and failed.attributes["error.type"] == (
        "ConnectionResetError")
    assert [e.name for e in failed.events] == ["exception"]
    assert cancelled.status.status_code is StatusCode.ERROR
    assert cancelled.status.description == "cancelled"
    assert not cancelled.events


def test_a_partly_failed_write(spans: tuple[tracing.OtelWriteTracer, InMemorySpanExporter]) -> None:
    writer, exporter = spans
    error = PartialWriteError({1: RetryableError("timeout"), 3: RetryableError("timeout")})
    writer.end(writer.begin("orders", "kafka", [msg() for _ in range(5)]), error)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "PartialWriteError"
    assert span.attributes["natsconn.failed_message_count"] == 2
    assert span.attributes["messaging.batch.message_count"] == 5


# ---------------------------------------------------------------- lifecycle


def test_configure_and_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    made = tracing.configure()
    assert made is not None and tracing.tracer() is made
    provider = tracing._provider
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "natsconn"
    tracing.shutdown()
    assert tracing.tracer() is None
    tracing.shutdown()  # twice: nothing happens


def test_service_name_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bridge-eu")
    tracing.configure()
    assert tracing._provider is not None
    assert tracing._provider.resource.attributes["service.name"] == "bridge-eu"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=bridge-us,team=data")
    tracing.configure()
    assert tracing._provider.resource.attributes["service.name"] == "bridge-us"
    assert tracing._provider.resource.attributes["team"] == "data"
