"""
PURE: the one place that decides transient versus permanent.

Maps an HTTP response status or a transport exception to an :data:`~handlers.base.Outcome`.
Imports exception *types* only; performs no I/O.
"""

from datetime import timedelta

import httpx

from handlers.base import Delivered, Failed, Outcome, Retry


class PermanentSendError(Exception):
    """
    Base for failures that retrying cannot fix (e.g. a destination the SSRF guard
    refuses). Raised anywhere under a send, even wrapped by a transport's own
    exceptions, it makes :func:`classify_exception` answer :class:`Failed`.
    """


def classify_status(status_code: int, *, retry_after: timedelta | None = None) -> Outcome:
    """
    The outcome of a delivery the receiver answered with ``status_code``.

    2xx is delivered; anything else, a timeout or a connection error is a failed
    attempt, retried; 410 Gone disables the endpoint. This follows Svix, which
    retries every non-2xx: a 400/401/404 is usually a receiver mid-deploy or a secret not
    rolled yet, and the schedule gives it a day to recover. 3xx counts as a failure
    because redirects are never followed (SSRF: a redirect could point anywhere).

    Args:
        status_code: the HTTP status.
        retry_after: the parsed ``Retry-After`` header, carried on :class:`Retry`.
    """
    if 200 <= status_code <= 299:
        return Delivered(status_code=status_code)
    if status_code == 410:
        return Failed(
            "410 Gone: the receiver asked us to stop; endpoint disabled",
            status_code=status_code,
            disable_destination=True,
        )
    if 300 <= status_code <= 399:
        reason = f"HTTP {status_code}: redirects are not followed"
    else:
        reason = f"HTTP {status_code}"
    return Retry(reason, status_code=status_code, after=retry_after)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def classify_exception(exc: BaseException) -> Outcome:
    """
    The outcome of a send that raised ``exc`` before any response arrived.

    - a :class:`PermanentSendError` anywhere in the cause chain: :class:`Failed`
      (the endpoint is not disabled: a DNS change can make it valid again);
    - an invalid or unsupported URL: :class:`Failed`;
    - timeouts (``httpx.TimeoutException``, ``TimeoutError``): :class:`Retry`;
    - anything else (connection refused or reset, DNS failure, protocol errors and
      even unexpected errors): :class:`Retry`, because a lost message is worse than a
      bounded number of useless attempts.
    """
    chain = _chain(exc)
    for link in chain:
        if isinstance(link, PermanentSendError):
            return Failed(f"{type(link).__name__}: {link}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return Failed(f"{type(exc).__name__}: {exc}")
    # Look through transport wrappers for the root cause: httpx-aiohttp maps every
    # aiohttp.ClientConnectionError, a refused connection included, to ConnectTimeout.
    if any(isinstance(link, TimeoutError) for link in chain):
        return Retry(_describe("timeout", exc))
    if any(isinstance(link, OSError) for link in chain):
        return Retry(_describe("connection error", exc))
    if isinstance(exc, httpx.TimeoutException):
        return Retry(_describe("timeout", exc))
    return Retry(_describe("error", exc))


def _describe(kind: str, exc: BaseException) -> str:
    detail = str(exc)
    return f"{kind}: {type(exc).__name__}: {detail}" if detail else f"{kind}: {type(exc).__name__}"
