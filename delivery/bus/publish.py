"""
Publishing a batch of messages to JetStream and awaiting their acknowledgements together.

The outbox relay publishes hundreds of rows at a time. nats-py's ``publish_async``
costs, per message, an ``asyncio.wait_for`` around its in-flight semaphore (a
``Timeout`` context even with no timeout), two random bytes from ``os.urandom`` for the
reply token and a done callback; in the due-now burst's profile that was about a
third of the relay's CPU (``bench/README.md``). :class:`BatchPublisher` writes the
same ``PUB`` (subject, payload, headers, a reply inbox) for each message and keeps one
future per message, resolved by one wildcard inbox subscription; the batch bounds
what is in flight, so no semaphore is needed. What reaches the server is what
``publish_async`` sends, so the wire and the stream's ``Nats-Msg-Id`` dedupe are
unchanged. The batch's ``HPUB`` commands are built here and queued for the connection's
flusher in one write (:func:`_hpub`), where nats-py's ``publish`` checked and queued
each message on its own (20,000 messages with their ``Nats-Msg-Id`` in batches of
1,000 to a memory stream on a local server, process CPU from publishing to every ack
read, three rounds: 22.5-24.2 us a message with ``publish``, 19.1-19.8 us so). The
write goes through nats-py's private ``_send_command`` and ``_flush_pending``, so
``pyproject.toml`` pins nats-py to a minor version, and a test holds each built command
to the bytes that version's ``publish`` queues.
"""

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Iterable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError
from nats.js.errors import APIError, NoStreamResponseError

NO_RESPONDERS_STATUS = "503"
"""The status header NATS puts on a reply when no stream listens on the subject."""


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name nats-py sends as given (its own check, without the strip it applies)."""
_VISIBLE = re.compile(r"[!-~]+")
"""A subject, reply or header value nats-py sends as given: visible ASCII, no spaces."""


def _hpub(subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> bytes | None:
    """
    The ``HPUB`` command nats-py's ``publish`` writes for this message, or ``None``
    when it would change or refuse something (a name or value with spaces or line
    breaks, which it strips, rewrites or rejects): that message goes through
    ``publish``.
    """
    if not (_VISIBLE.fullmatch(subject) and _VISIBLE.fullmatch(reply)):
        return None
    hdr = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        if not (_TOKEN.fullmatch(key) and _VISIBLE.fullmatch(value)):
            return None
        hdr.append(f"{key}: {value}\r\n".encode())
    hdr.append(b"\r\n")
    head = b"".join(hdr)
    size = len(head)
    return (
        f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
        + head
        + payload
        + b"\r\n"
    )


def takes_joined(nc: Client) -> bool:
    """
    Whether commands built here may be queued on ``nc`` (:func:`write_joined`): only
    while it is connected and not draining its publishes, the states in which nats-py's
    ``publish`` would itself queue them; otherwise messages go through ``publish`` (or
    ``ack``), which raises or buffers as nats-py decides.
    """
    return nc.is_connected and not nc.is_draining_pubs


async def write_joined(nc: Client, commands: bytes) -> None:
    """
    Queue ``commands`` (whole protocol lines, as nats-py writes them) on ``nc`` in one
    piece and kick its flusher as ``publish`` does, only when no flush is pending.

    nats-py's private ``_send_command``, ``_flush_queue`` and ``_flush_pending``: the
    one place this package writes through them (nats-py is pinned to a minor version).
    """
    await nc._send_command(commands)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


class BatchPublisher:
    """
    Publishes to JetStream through one connection, one future per message.

    Each future's result is ``True`` when JetStream reported the message as a
    duplicate (its ``Nats-Msg-Id`` already stored), ``False`` when it stored it; its
    exception is what JetStream answered instead (``APIError``, or
    ``NoStreamResponseError`` when no stream takes the subject).

    Args:
        nc: a connected NATS client.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._futures: dict[str, asyncio.Future[bool]] = {}
        self._tokens = itertools.count()
        self._prefix = ""
        self._sub: Subscription | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran: the reply inbox is gone and nothing more is published."""
        return self._closed

    async def publish(
        self, messages: Iterable[tuple[str, bytes, dict[str, str]]]
    ) -> list[asyncio.Future[bool]]:
        """
        Publish each ``(subject, payload, headers)`` in order; one future per message.

        A future that is not wanted any more (a timeout) must be cancelled, which
        forgets it.

        Raises:
            RuntimeError: the publisher was closed (its acks would have no inbox).
        """
        if self._closed:
            raise RuntimeError("BatchPublisher is closed")
        if self._sub is None:
            inbox = self._nc.new_inbox()
            self._prefix = inbox + "."
            self._sub = await self._nc.subscribe(inbox + ".*", cb=self._on_reply)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = []
        nc = self._nc
        publish, prefix, pending = nc.publish, self._prefix, self._futures
        tokens = self._tokens
        # Built commands only while connected and not draining; otherwise every
        # message goes through publish, which raises or buffers as nats-py decides.
        joined: list[bytes] | None = [] if takes_joined(nc) else None
        try:
            for subject, payload, headers in messages:
                token = str(next(tokens))
                future: asyncio.Future[bool] = loop.create_future()
                pending[token] = future
                futures.append(future)
                reply = prefix + token
                command = (
                    _hpub(subject, reply, payload, headers)
                    if joined is not None and len(payload) <= nc.max_payload
                    else None
                )
                if command is not None and joined is not None:
                    joined.append(command)
                    continue
                if joined:
                    # In order: what was built goes before this message.
                    await write_joined(nc, b"".join(joined))
                # The rest of the batch goes through publish too: the awaits above may
                # have let the connection start reconnecting or draining, which only
                # publish checks (the loop up to here has no await).
                joined = None
                await publish(subject, payload, reply=reply, headers=headers)
            if joined:
                await write_joined(nc, b"".join(joined))
        except BaseException:
            for one in futures:
                one.cancel()
            self.forget(futures)
            raise
        return futures

    def forget(self, futures: Iterable[asyncio.Future[bool]]) -> None:
        """Drop the futures of a batch that is done with (resolved or given up)."""
        gone = set(map(id, futures))
        for token in [t for t, f in self._futures.items() if id(f) in gone]:
            del self._futures[token]

    async def close(self) -> None:
        """
        Unsubscribe the reply inbox (the connection stays open) and cancel the futures
        still waiting for an ack: no ack can reach them any more, so a caller awaiting
        one returns at once instead of at its timeout (its rows stay unsent and are
        published again, deduplicated by their ``Nats-Msg-Id``). Idempotent; the
        publisher takes no batch after it.
        """
        self._closed = True
        pending, self._futures = list(self._futures.values()), {}
        for future in pending:
            future.cancel()
        sub, self._sub = self._sub, None
        if sub is not None:
            # A connection already closed or draining takes its subscriptions with it.
            with contextlib.suppress(ConnectionClosedError, ConnectionDrainingError):
                await sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            reply = json.loads(msg.data)
        except ValueError as exc:
            future.set_exception(exc)
            return
        if "error" in reply:
            future.set_exception(APIError.from_error(reply["error"]))
            return
        future.set_result(bool(reply.get("duplicate", False)))
