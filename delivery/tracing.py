"""
What follows one message across processes: its request id and, when tracing is on,
its OpenTelemetry trace context.

Both travel as a *carrier*, a small ``str -> str`` mapping: ``X-Request-Id`` and the
W3C ``traceparent`` (and ``tracestate``). The API stores the carrier of the request
beside the outbox row it writes (the ``headers`` column; the payload stays what
consumers read); the relay sends it as the NATS message's headers; each consumer
reads the headers and passes the carrier on to what it writes next, so one grep of
the message id, or one trace id, shows the message's whole path.

Tracing is off unless ``DELIVERY_OTEL_EXPORTER`` is ``otlp`` or ``console``. Off,
:func:`enabled` is false and every caller skips its tracing branch: no spans, no
context objects, nothing on the hot path but that one check.
"""

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import structlog
from opentelemetry import trace
from opentelemetry.propagate import extract, inject

from delivery import jsontext

if TYPE_CHECKING:
    # The SDK (and psutil, which its resources import) costs ~1.5 MB of RSS in every
    # process; tracing is off by default, so :func:`configure` imports it when turned on.
    from opentelemetry.sdk.trace import TracerProvider

REQUEST_ID_HEADER = "X-Request-Id"
"""The request id's header, on HTTP and on NATS messages."""
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CARRIED = (REQUEST_ID_HEADER, TRACEPARENT, TRACESTATE)
"""The headers a carrier may hold."""

EXPORTERS = ("", "none", "otlp", "console")
"""``DELIVERY_OTEL_EXPORTER`` values; empty and ``none`` leave tracing off."""

type Carrier = dict[str, str]

_tracer: trace.Tracer | None = None
"""The tracer once tracing is on; ``None`` (off) is what the hot paths test."""
_provider: "TracerProvider | None" = None


def enabled() -> bool:
    """Whether spans are recorded (``DELIVERY_OTEL_EXPORTER`` set, or a test provider)."""
    return _tracer is not None


def configure(exporter: str, *, service: str) -> None:
    """
    Turn tracing on with ``exporter`` (``otlp``: OTLP over HTTP, configured by the
    standard ``OTEL_EXPORTER_OTLP_*`` variables; ``console``: spans on stdout).
    Empty or ``none`` leaves it off. Called once, at the process edge.
    """
    if exporter in ("", "none"):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    span_exporter: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    use_provider(provider)


def use_provider(provider: "TracerProvider | None") -> None:
    """Record spans with ``provider`` (tests: an in-memory exporter); ``None`` turns off."""
    global _tracer, _provider
    if _provider is not None and _provider is not provider:
        _provider.shutdown()
    _provider = provider
    _tracer = provider.get_tracer("delivery") if provider is not None else None


def shutdown() -> None:
    """Flush and stop the exporter (on process exit)."""
    use_provider(None)


def _current_ids() -> Carrier:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return {REQUEST_ID_HEADER: request_id} if isinstance(request_id, str) else {}


def carrier() -> Carrier:
    """The carrier of the current context: its request id and, if tracing, its span."""
    found = _current_ids()
    if _tracer is not None:
        inject(found)
    return found


def carrier_of(headers: Mapping[str, str] | None) -> Carrier | None:
    """The carried headers of a NATS message's ``headers``; ``None`` when it has none."""
    if not headers:
        return None
    found = {k: headers[k] for k in CARRIED if k in headers}
    return found or None


def loaded(stored: str | None) -> Carrier | None:
    """The carrier stored beside an outbox row (a JSON object), as it was; ``None`` for none."""
    if not stored:
        return None
    try:
        value = json.loads(stored)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if k in CARRIED and isinstance(v, str)} or None


def publish_headers(stored: str) -> Carrier:
    """
    The carrier stored beside an outbox row (a JSON object), as NATS headers.

    When tracing, the publish is a span of the stored trace and the headers name it.
    """
    try:
        value = json.loads(stored)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    found = {k: v for k, v in value.items() if k in CARRIED and isinstance(v, str)}
    if _tracer is not None and found:
        with span("outbox publish", found, kind=trace.SpanKind.PRODUCER):
            inject(found)
    return found


def stored(found: Mapping[str, str] | None) -> str | None:
    """A carrier as the outbox stores it (JSON), or ``None`` for none."""
    return jsontext.sorted_ascii(dict(found)) if found else None


def current_stored() -> str | None:
    """The current context's carrier (:func:`carrier`) as the outbox stores it."""
    return stored(carrier())


def request_id_of(found: Mapping[str, str] | None) -> dict[str, str]:
    """``{"request_id": ...}`` to bind into a log line, or nothing."""
    if found and REQUEST_ID_HEADER in found:
        return {"request_id": found[REQUEST_ID_HEADER]}
    return {}


@contextlib.contextmanager
def span(
    name: str,
    parent: Mapping[str, str] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[trace.Span | None]:
    """
    A span named ``name``, child of the trace ``parent`` carries (or of the current
    span), made current while the block runs; yields ``None`` when tracing is off.
    """
    if _tracer is None:
        yield None
        return
    ctx = extract(parent) if parent else None
    with _tracer.start_as_current_span(
        name, context=ctx, kind=kind, attributes=dict(attributes or {})
    ) as current:
        yield current


def start_span(
    name: str,
    parent: Mapping[str, str] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, str | int] | None = None,
) -> trace.Span:
    """A started span the caller ends (``trace.use_span`` makes it current); tracing on only."""
    if _tracer is None:
        return trace.INVALID_SPAN
    ctx = extract(parent) if parent else None
    return _tracer.start_span(name, context=ctx, kind=kind, attributes=dict(attributes or {}))


def child_carrier(found: Mapping[str, str] | None) -> Carrier | None:
    """``found`` with the current span as the parent (what a consumer passes on)."""
    if found is None:
        return None
    passed = dict(found)
    if _tracer is not None:
        inject(passed)
    return passed
