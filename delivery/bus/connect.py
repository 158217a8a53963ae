"""
Reaching NATS at start-up: a bounded check, then a client that reconnects for ever.

A client built to reconnect for ever (``max_reconnect_attempts=-1``, what a
long-running part wants once it runs) also retries its *first* connection for
ever, printing a traceback per attempt: a typo in ``DELIVERY_NATS_URL`` would hang
start-up instead of failing it. :func:`ensure_reachable` tries a plain TCP
connection to the configured servers for a bounded time first, so an unreachable
NATS is one clear start-up failure.
"""

import asyncio
import time
from urllib.parse import urlsplit

from nats.errors import NoServersError

DEFAULT_PORT = 4222


class NatsUnreachableError(ConnectionError):
    """No configured NATS server accepted a connection within the start-up bound."""


def server_urls(nats_url: str) -> list[str]:
    """The servers of a comma-separated ``DELIVERY_NATS_URL``."""
    return [u.strip() for u in nats_url.split(",") if u.strip()]


async def ensure_reachable(urls: list[str], *, within_s: float = 10.0) -> None:
    """
    Return once one of ``urls`` accepts a TCP connection; retry for ``within_s``.

    Raises:
        NatsUnreachableError: none did, naming the servers and the last error.
    """
    deadline = time.monotonic() + within_s
    last: BaseException | None = None
    while True:
        for url in urls:
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(parts.hostname, parts.port or DEFAULT_PORT), 2.0
                )
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            writer.close()
            return
        if time.monotonic() >= deadline:
            reason = getattr(last, "strerror", None) or repr(last)
            raise NatsUnreachableError(
                f"cannot reach NATS at {', '.join(urls)} ({reason}); check DELIVERY_NATS_URL "
                "and that nats-server is running with JetStream"
            )
        await asyncio.sleep(0.5)


def describe_nats_error(exc: BaseException) -> str | None:
    """One line for a NATS failure met at start-up, or ``None`` if ``exc`` is not one."""
    if isinstance(exc, NatsUnreachableError):
        return str(exc)
    if isinstance(exc, NoServersError):
        return "cannot reach any NATS server; check DELIVERY_NATS_URL"
    return None
