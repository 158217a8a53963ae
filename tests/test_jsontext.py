"""The encoders built once write exactly what ``json.dumps`` writes with the same options."""

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from delivery import jsontext
from delivery.jsontext import JsonText
from delivery.logs import _log_line, _render

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    # Controls, quotes, backslashes, line separators and characters beyond the BMP.
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(codec="utf-8"), max_size=8), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@given(VALUES)
def test_each_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    """Sorted or not, escaped or not, compact or spaced: the same text, any value."""
    assert jsontext.canonical(value) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert jsontext.sorted_ascii(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert JsonText(ensure_ascii=False)(value) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False
    )
    assert JsonText(separators=(", ", ": "))(value) == json.dumps(value)


def test_default_circular_and_unknown_values_behave_as_json_dumps() -> None:
    """``default`` is called for what JSON has no form for; a loop and a stranger raise."""
    at = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    with_default = JsonText(default=lambda v: v.isoformat())
    assert with_default({"at": at, "n": [at]}) == json.dumps(
        {"at": at, "n": [at]}, separators=(",", ":"), default=lambda v: v.isoformat()
    )
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular"):
        jsontext.canonical({"x": looped})
    # A second call after the failure starts from fresh markers.
    assert jsontext.canonical({"x": [1]}) == '{"x":[1]}'
    with pytest.raises(TypeError):
        jsontext.canonical({"x": object()})


def test_log_lines_are_structlog_default_json() -> None:
    """The renderer's text is what structlog's own ``JSONRenderer()`` writes, repr for strangers."""

    class Custom:
        def __structlog__(self) -> str:
            return "custom form"

    event = {
        "event": "request",
        "status": 201,
        "path": "/api/v1/événements",
        "took_ms": 1.25,
        "custom": Custom(),
        "stranger": ValueError("no JSON form"),
        "nested": {"b": [1, None], "a": True},
    }
    expected = structlog.processors.JSONRenderer()(None, "info", dict(event))
    assert _render(dict(event), default=repr) == expected
    assert _log_line(dict(event)) == expected
