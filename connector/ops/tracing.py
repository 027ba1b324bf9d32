"""OpenTelemetry traces of sink writes (optional extra ``otel``).

The engine asks :func:`tracer` once per pipeline; ``None`` (tracing off, the
default) makes each write skip every tracing step.

Tracing is turned on by the standard ``OTEL_*`` environment variables only
(docs/operations.md, "Tracing"), read once by :func:`configure`, which
``natsconn run`` calls before it starts the pipelines:

- ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set;
- ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, both comma-separated, or
  ``none``) turns it on or off explicitly;
- without it, setting ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` turns on OTLP export;
- nothing set: off. (The OpenTelemetry default exporter is ``otlp``; natsconn
  exports only when asked, so an unconfigured bridge opens no connection.)

The protocol is ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` or
``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (the default) or ``grpc``.
Everything else (endpoint, headers, timeout, compression, TLS, the sampler,
the batch processor's ``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``) the SDK
reads itself. The service name is ``OTEL_SERVICE_NAME``, else ``natsconn``.

Each batch write is one span, ``natsconn write <sink>``, of kind CLIENT, with
a link to the parent context of each message that carries a W3C
``traceparent`` (and ``tracestate``) header: deduplicated, at most
:data:`MAX_LINKS` (or ``OTEL_SPAN_LINK_COUNT_LIMIT``) per span. The span is
not made current and nothing is injected into the messages: their own
``traceparent`` goes on to the sink unchanged, so a consumer downstream sees
the producer's trace.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import ConfigError, PartialWriteError
from .._message import Message

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link

log = logging.getLogger("natsconn.tracing")

MAX_LINKS = 128
"""Links per span unless ``OTEL_SPAN_LINK_COUNT_LIMIT`` says otherwise (the SDK's default)."""

SERVICE_NAME = "natsconn"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
INSTALL_HINT = "pip install 'natsconn[otel]'"


class WriteTracer(Protocol):
    """Spans around sink writes, linked to the messages' own trace contexts."""

    def begin(self, pipeline: str, sink: str, messages: Sequence[Message]) -> Any:
        """Start the span of one batch write; the value is handed to :meth:`end`."""

    def end(self, span: Any, error: BaseException | None) -> None:
        """End it, recording ``error`` when the write failed."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class Settings:
    """What the environment asks for; :func:`settings` gives None when tracing is off."""

    exporters: tuple[str, ...]
    protocol: str = "http/protobuf"
    max_links: int = MAX_LINKS
    reason: str = ""  # the variable that turned it on, for the log and errors


def _env(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def settings(env: Mapping[str, str] | None = None) -> Settings | None:
    """Read the ``OTEL_*`` variables (``os.environ`` by default); None means off.

    Raises :class:`ConfigError` for a value natsconn cannot honour (an unknown
    exporter or protocol, a link limit that is not a number).
    """
    env = os.environ if env is None else env
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return None
    listed = _env(env, "OTEL_TRACES_EXPORTER")
    if listed:
        names = tuple(dict.fromkeys(n.strip().lower() for n in listed.split(",") if n.strip()))
        unknown = [n for n in names if n not in (*EXPORTERS, "none")]
        if unknown:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} "
                              f"(expected otlp, console or none; found {listed!r})")
        exporters = tuple(n for n in names if n != "none")
        if not exporters:
            return None
        reason = f"OTEL_TRACES_EXPORTER={listed}"
    else:
        endpoint = next((n for n in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                     "OTEL_EXPORTER_OTLP_ENDPOINT") if _env(env, n)), None)
        if endpoint is None:
            return None
        exporters, reason = ("otlp",), f"{endpoint} is set"
    protocol = (_env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").lower()
    if "otlp" in exporters and protocol not in PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: natsconn exports traces over "
                          f"http/protobuf or grpc; found {protocol!r}")
    limit = _env(env, "OTEL_SPAN_LINK_COUNT_LIMIT")
    try:
        max_links = int(limit) if limit else MAX_LINKS
    except ValueError:
        raise ConfigError(f"OTEL_SPAN_LINK_COUNT_LIMIT: expected a whole number, "
                          f"found {limit!r}") from None
    return Settings(exporters, protocol, max(0, max_links), reason)


# --------------------------------------------------------------------- links


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]``, else the first header whose name matches it in any case
    (HTTP gateways in front of NATS or Kafka may write ``Traceparent``)."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


_extract: Any = None  # (headers) -> Context, made on first use: the SDK is imported lazily


def _extractor() -> Any:
    global _extract
    if _extract is None:
        from opentelemetry.propagators.textmap import Getter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        class HeaderGetter(Getter[Mapping[str, str]]):
            """A TextMap getter over a message's headers (case-insensitive names)."""

            def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
                value = header(carrier, key)
                return None if value is None else [value]

            def keys(self, carrier: Mapping[str, str]) -> list[str]:
                return list(carrier)

        propagator, getter = TraceContextTextMapPropagator(), HeaderGetter()

        def extract(headers: Mapping[str, str]) -> Any:
            return propagator.extract(headers, getter=getter)

        _extract = extract
    return _extract


def links_of(messages: Sequence[Message], limit: int = MAX_LINKS) -> tuple[list[Link], int]:
    """(links, dropped): a link to each distinct valid parent context carried by
    ``messages``' ``traceparent``/``tracestate`` headers, in message order, at most
    ``limit``; ``dropped`` counts the further distinct ``traceparent`` values the
    cap left out. A malformed ``traceparent`` is ignored, as the W3C propagator
    ignores it. Each link carries the first such message's ``messaging.message.id``."""
    from opentelemetry import trace

    extract = _extractor()
    links: list[Link] = []
    seen_raw: set[str] = set()
    seen: set[tuple[int, int]] = set()
    dropped = 0
    for m in messages:
        headers = m.headers
        if not headers:
            continue
        raw = header(headers, TRACEPARENT)
        if raw is None or raw in seen_raw:
            continue
        seen_raw.add(raw)
        if len(links) >= limit:
            dropped += 1
            continue
        context = trace.get_current_span(extract(headers))
        parent = context.get_span_context()
        if not parent.is_valid:
            continue
        identity = (parent.trace_id, parent.span_id)
        if identity in seen:  # the same span written differently (case, tracestate)
            continue
        seen.add(identity)
        links.append(trace.Link(parent, {"messaging.message.id": m.id} if m.id else None))
    return links, dropped


# -------------------------------------------------------------------- tracer


class OtelWriteTracer:
    """A :class:`WriteTracer` on an OpenTelemetry tracer."""

    def __init__(self, otel_tracer: Any, max_links: int = MAX_LINKS) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._tracer = otel_tracer
        self._max_links = max_links
        self._kind = SpanKind.CLIENT
        self._status = Status
        self._error = StatusCode.ERROR

    def begin(self, pipeline: str, sink: str, messages: Sequence[Message]) -> Any:
        links, dropped = links_of(messages, self._max_links)
        attributes: dict[str, str | int] = {
            "natsconn.pipeline": pipeline,
            "natsconn.sink": sink,
            "messaging.operation.type": "send",
            "messaging.batch.message_count": len(messages),
        }
        if dropped:
            attributes["natsconn.links.dropped"] = dropped
        return self._tracer.start_span(f"natsconn write {sink}", kind=self._kind,
                                       attributes=attributes, links=links)

    def end(self, span: Any, error: BaseException | None) -> None:
        if error is not None:
            if isinstance(error, asyncio.CancelledError):  # a stop cut the write short
                span.set_attribute("error.type", "cancelled")
                span.set_status(self._status(self._error, "cancelled"))
            else:
                span.set_attribute("error.type", type(error).__qualname__)
                if isinstance(error, PartialWriteError):  # the others were written
                    span.set_attribute("natsconn.failed_message_count", len(error.failed))
                span.record_exception(error)
                span.set_status(self._status(self._error, f"{type(error).__name__}: {error}"))
        span.end()


# ----------------------------------------------------------------- lifecycle

_provider: TracerProvider | None = None
_tracer: WriteTracer | None = None


def tracer() -> WriteTracer | None:
    """The process's write tracer, or None when tracing is off."""
    return _tracer


def configure(env: Mapping[str, str] | None = None) -> WriteTracer | None:
    """Turn tracing on when the environment asks for it (see the module's doc);
    returns the tracer, or None when tracing is off. A second call replaces the
    first (after flushing it).

    Raises :class:`ConfigError` when tracing is asked for but cannot be had: the
    ``otel`` extra is not installed, or a variable has a value natsconn cannot use.
    """
    global _provider, _tracer
    wanted = settings(env)
    shutdown()
    if wanted is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError as exc:
        raise ConfigError(f"tracing is asked for ({wanted.reason}) but the OpenTelemetry "
                          f"SDK is not installed ({exc.name} is missing): {INSTALL_HINT}, "
                          "or unset the OTEL_* variables") from None
    from .. import __version__

    exporters: list[SpanExporter] = []
    for name in wanted.exporters:
        exporters.append(ConsoleSpanExporter() if name == "console"
                         else _otlp_exporter(wanted))
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = OtelWriteTracer(provider.get_tracer("natsconn", __version__), wanted.max_links)
    log.info("tracing on (%s): %s, service %s", wanted.reason,
             ", ".join(f"otlp over {wanted.protocol}" if n == "otlp" else n
                       for n in wanted.exporters),
             resource.attributes.get("service.name"))
    return _tracer


def _otlp_exporter(wanted: Settings) -> Any:
    """The OTLP span exporter of the protocol asked for; it reads its endpoint,
    headers, timeout, compression and certificates from ``OTEL_EXPORTER_OTLP_*``."""
    if wanted.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL=grpc but the OTLP/gRPC exporter "
                              f"is not installed ({exc.name} is missing): {INSTALL_HINT}, "
                              "or use http/protobuf") from None
        return GrpcExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
    except ImportError as exc:
        raise ConfigError(f"tracing is asked for ({wanted.reason}) but the OTLP/HTTP "
                          f"exporter is not installed ({exc.name} is missing): "
                          f"{INSTALL_HINT}") from None
    return HttpExporter()


def shutdown(timeout: float = 10.0) -> None:
    """Export what is still queued (waiting at most ``timeout`` seconds) and turn
    tracing off; nothing happens when it is off. Blocking: from a coroutine, run
    it in a thread."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is None:
        return
    try:
        provider.force_flush(int(timeout * 1000))
    finally:
        provider.shutdown()
