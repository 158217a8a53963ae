"""Tracing is off unless asked for; a bad exporter name is a configuration error."""

import pytest
import structlog
from pydantic import ValidationError

from delivery import tracing
from delivery.settings import Settings


def test_an_unknown_exporter_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(otel_exporter="jaeger")
    (error,) = caught.value.errors()
    assert error["loc"] == ("otel_exporter",)
    assert "'otlp'" in error["msg"]
    assert Settings(otel_exporter=" OTLP ").otel_exporter == "otlp"


def test_off_by_default_spans_are_none_and_carriers_hold_only_the_request_id() -> None:
    assert not tracing.enabled()
    with tracing.span("anything", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) as s:
        assert s is None
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        assert tracing.carrier() == {"X-Request-Id": "req-1"}
    assert tracing.carrier() == {}
    assert tracing.carrier_of({"Nats-Msg-Id": "m1"}) is None
    assert tracing.carrier_of({"Nats-Msg-Id": "m1", "X-Request-Id": "r"}) == {"X-Request-Id": "r"}


def test_console_exporter_turns_tracing_on_and_shutdown_off() -> None:
    tracing.configure("none", service="test")
    assert not tracing.enabled()
    tracing.configure("console", service="test")
    try:
        assert tracing.enabled()
        with tracing.span("outer") as outer:
            assert outer is not None
            found = tracing.carrier()
        assert found["traceparent"].split("-")[1] == format(
            outer.get_span_context().trace_id, "032x"
        )
    finally:
        tracing.shutdown()
    assert not tracing.enabled()
