"""Transient versus permanent: the status and exception tables."""

import socket

import aiohttp
import httpx
import pytest

from handlers.base import Delivered, Failed, Retry
from handlers.classify import classify_exception, classify_status
from handlers.ssrf import BlockedAddressError

STATUS_TABLE = [
    (200, Delivered),
    (201, Delivered),
    (204, Delivered),
    (299, Delivered),
    (301, Retry),
    (302, Retry),
    (400, Retry),
    (401, Retry),
    (403, Retry),
    (404, Retry),
    (408, Retry),
    (409, Retry),
    (413, Retry),
    (425, Retry),
    (429, Retry),
    (500, Retry),
    (502, Retry),
    (503, Retry),
    (504, Retry),
]


@pytest.mark.parametrize(("status", "kind"), STATUS_TABLE, ids=[str(s) for s, _ in STATUS_TABLE])
def test_status_table(status: int, kind: type) -> None:
    """2xx is delivered; every other status except 410 is retried (as Svix does)."""
    outcome = classify_status(status)
    assert isinstance(outcome, kind)
    assert outcome.status_code == status


def test_gone_is_permanent_and_disables() -> None:
    """410 Gone is permanent and disables the endpoint."""
    outcome = classify_status(410)
    assert isinstance(outcome, Failed)
    assert outcome.disable_destination


def test_redirect_reason_says_not_followed() -> None:
    """A 3xx is a failed attempt whose reason explains redirects are not followed."""
    outcome = classify_status(307)
    assert isinstance(outcome, Retry)
    assert "not followed" in outcome.reason


def test_retry_after_is_carried() -> None:
    """The parsed Retry-After rides on the Retry outcome."""
    from datetime import timedelta

    outcome = classify_status(429, retry_after=timedelta(seconds=30))
    assert isinstance(outcome, Retry)
    assert outcome.after == timedelta(seconds=30)


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as caught:
        return caught


EXCEPTION_TABLE = [
    ("httpx-read-timeout", httpx.ReadTimeout("slow"), Retry, "timeout"),
    ("builtin-timeout", TimeoutError(), Retry, "timeout"),
    ("connect-refused", httpx.ConnectError("refused"), Retry, "error"),
    (
        "aiohttp-refused-mapped-as-timeout",
        _wrapped(httpx.ConnectTimeout("x"), ConnectionRefusedError(111, "refused")),
        Retry,
        "connection error",
    ),
    ("dns-failure", socket.gaierror(-2, "Name or service not known"), Retry, "connection error"),
    ("reset", ConnectionResetError(104, "reset"), Retry, "connection error"),
    ("protocol", httpx.RemoteProtocolError("bad"), Retry, "error"),
    ("server-disconnected", aiohttp.ServerDisconnectedError(), Retry, "error"),
    ("unexpected", RuntimeError("bug"), Retry, "error"),
    ("ssrf-direct", BlockedAddressError("refused: 10.0.0.1 is private"), Failed, "10.0.0.1"),
    (
        "ssrf-wrapped",
        _wrapped(httpx.ConnectError("dns"), BlockedAddressError("127.0.0.1 is loopback")),
        Failed,
        "loopback",
    ),
    ("bad-scheme", httpx.UnsupportedProtocol("ftp"), Failed, "UnsupportedProtocol"),
]


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [row[1:] for row in EXCEPTION_TABLE],
    ids=[row[0] for row in EXCEPTION_TABLE],
)
def test_exception_table(exc: BaseException, kind: type, reason: str) -> None:
    """Timeouts and connection errors retry; SSRF refusals and bad URLs do not."""
    outcome = classify_exception(exc)
    assert isinstance(outcome, kind)
    assert not isinstance(outcome, Delivered)
    assert reason in outcome.reason
    if isinstance(outcome, Failed):
        assert not outcome.disable_destination
