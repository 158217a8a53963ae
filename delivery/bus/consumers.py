"""
The one consumer shape every NATS subscriber here uses: a durable JetStream batch pull
consumer with manual acks, whose handler receives the raw messages.

The dispatcher and both handler workers subscribe through :func:`subscribe_batches`
and settle each batch with :func:`settle_batch`, so ack policy, decoding and
batching are decided once.

Importing this module also applies :func:`normalise_fetch_timeouts` (see there): a
fix for fetched messages that FastStream's batch pull loop dropped, to be redelivered
only after ``ack_wait``; and :func:`take_queued_messages_at_once` (see there), which
takes the per-message task out of a batch pull.
"""

import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import nats.errors
from faststream import AckPolicy, StreamMessage
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from delivery.bus.publish import takes_joined, write_joined
from delivery.metrics import CONSUMER_MESSAGES
from delivery.tracing import Carrier, carrier_of

type _Fetch = Callable[..., Coroutine[Any, Any, list[Msg]]]

_nats_fetch: _Fetch = JetStreamContext.PullSubscription.fetch
"""nats-py's own ``PullSubscription.fetch``, which :func:`normalise_fetch_timeouts` wraps."""


def normalise_fetch_timeouts() -> None:
    """
    Make ``PullSubscription.fetch`` signal every timeout as ``nats.errors.TimeoutError``.

    FastStream's batch pull loop (0.7.8, ``BatchPullStreamSubscriber._consume_pull``)
    fetches repeatedly until the batch is full or its window ends, and catches
    ``nats.errors.TimeoutError`` to end the window. nats-py 2.16's ``fetch`` also
    raises a bare ``asyncio.TimeoutError`` when the window runs out between its two
    pull requests. That one escaped the loop, and every message already fetched in
    the window was dropped unacked: JetStream redelivered it after ``ack_wait``. In
    the 100k bursts of ``bench/bench_burst.py`` that was 3 to 6 batches, up to about
    1% of the notifications, each 30 s late (found by recording stream sequences at
    ``fetch`` and at the handler: every redelivered message had been fetched and
    never handed over). Any consumer could hit it, the handlers' too, and a lone
    message in a quiet system as well. Raised as the nats-py subclass, the loop ends
    the window and hands the batch over. Idempotent; code that catches the builtin
    ``TimeoutError`` still catches it.
    """
    current = JetStreamContext.PullSubscription.fetch
    if getattr(current, "_normalised", False):
        return

    @functools.wraps(current)
    async def fetch(self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> Any:
        try:
            return await _nats_fetch(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch._normalised = True  # type: ignore[attr-defined]
    JetStreamContext.PullSubscription.fetch = fetch  # type: ignore[method-assign]


normalise_fetch_timeouts()

_nats_next_msg: Callable[..., Coroutine[Any, Any, Msg]] = Subscription.next_msg
"""nats-py's own ``Subscription.next_msg``, which :func:`take_queued_messages_at_once` wraps."""


def take_queued_messages_at_once() -> None:
    """
    Let ``Subscription.next_msg`` return a message already queued without a task.

    nats-py's pull ``fetch`` takes a batch one ``next_msg`` call per message, and
    each call makes a ``uuid4`` name, a task and an ``asyncio.wait_for`` around the
    queue's ``get``, even when the message has already arrived; in a due-now burst
    that was most of the consumers' own cost per message (py-spy, see
    ``bench/README.md``). When the subscription's queue holds a message this returns
    it at once, with nats-py's own bookkeeping (pending bytes, ``task_done``); an
    empty queue, a callback subscription, a closed connection or a spent timeout
    (``timeout <= 0``, which nats-py answers with a timeout even when a message is
    queued) go to nats-py's method unchanged. Idempotent.
    """
    current = Subscription.next_msg
    if getattr(current, "_at_once", False):
        return

    @functools.wraps(current)
    async def next_msg(self: Subscription, timeout: float | None = 1.0) -> Msg:  # noqa: ASYNC109 - nats-py's signature
        queue = self._pending_queue
        if (
            queue.qsize()
            and (timeout is None or timeout > 0)
            and not self._cb
            and not self._conn.is_closed
        ):
            msg = queue.get_nowait()
            self._pending_size -= len(msg.data)
            queue.task_done()
            return msg
        return await _nats_next_msg(self, timeout)

    next_msg._at_once = True  # type: ignore[attr-defined]
    Subscription.next_msg = next_msg  # type: ignore[method-assign]


take_queued_messages_at_once()


async def ack_all(raws: Sequence[Msg]) -> None:
    """
    Acknowledge each of ``raws`` (JetStream messages of one connection) in one write.

    What reaches the server is what ``Msg.ack`` sends per message (an empty ``PUB`` to
    the message's reply subject), so JetStream sees the same acks; here the batch's
    ``PUB`` lines are joined and queued for the connection's flusher at once. nats-py's
    ``ack`` goes through the whole ``publish`` path per message (subject checks, a
    command, a flush request with its own future): 3.9 us an ack against 1.0 us for
    the joined write (20,000 acks to a local server, process CPU), in a due-now burst
    two acks per fire (the webhook and channel consumers). The reply subjects are the
    server's own (read from its ``MSG`` lines, so without spaces or line breaks), which
    is what ``publish``'s subject check is for. A message already acked or without a
    reply raises before anything is sent, as ``ack`` does; a connection not connected
    (reconnecting, closed) or draining its publishes takes the per-message path, which
    raises or buffers as nats-py decides. So do messages without a connection of their
    own or with an ``ack`` of their own (FastStream's in-memory test broker patches
    both): their ``ack`` is what acknowledging them means. The joined write goes
    through nats-py's private names (:func:`~delivery.bus.publish.write_joined`,
    ``Msg._check_reply``, ``_ackd``), so ``pyproject.toml`` pins nats-py to a minor
    version; a test acks a batch this way against JetStream.
    """
    if not raws:
        return
    # None on FastStream's in-memory test broker's messages, whatever nats-py's type says.
    client = cast(Client | None, raws[0]._client)
    if (
        client is None
        or not takes_joined(client)
        or any(raw._client is not client or type(raw).ack is not Msg.ack for raw in raws)
    ):
        for raw in raws:
            await raw.ack()
        return
    for raw in raws:
        raw._check_reply()
    await write_joined(
        client, b"".join([b"PUB " + raw.reply.encode() + b" 0\r\n\r\n" for raw in raws])
    )
    for raw in raws:
        raw._ackd = True


BatchHandler = Callable[[Sequence[Msg]], Awaitable[object]]
"""Receives one pulled batch; it acks, naks or terminates each message itself."""


async def raw_batch(message: StreamMessage[Any]) -> Any:
    """
    Hand the handler the batch's raw messages instead of FastStream's decoded bodies.

    FastStream's decoder raises on a JSON content type with a broken body before
    the handler could terminate the message, so a poison message would be
    redelivered forever; handlers validate each raw message themselves.
    """
    return message.raw_message


def batch_broker(urls: str | list[str], *, graceful_timeout: float) -> NatsBroker:
    """
    A broker for :func:`subscribe_batches` subscribers, without FastDepends.

    The handler takes the raw batch as its one argument (:func:`raw_batch`), so there
    is nothing to inject or validate. With FastDepends on, each batch went through
    its argument model and, for the ``Context("message")`` that used to fetch the raw
    batch, a hop to anyio's worker thread (a sync getter run in a thread pool): in a
    due-now burst (py-spy, ``bench/README.md``) that was about 3% of the daemon's
    busy samples, a third of the handlers' consumers. ``logger=None``: every line we
    log goes through structlog with ids bound.
    """
    return NatsBroker(urls, graceful_timeout=graceful_timeout, logger=None, apply_types=False)


def subscribe_batches(
    broker: NatsBroker,
    *,
    subject: str,
    stream: str,
    durable: str,
    batch: int,
    ack_wait_s: float,
    pull_wait_s: float,
    handler: BatchHandler,
    deliver_policy: DeliverPolicy | None = None,
    title: str | None = None,
    description: str | None = None,
) -> None:
    """
    Register ``handler`` as a durable batch pull consumer of ``subject`` on ``stream``.

    Args:
        batch: the pull size; at most ``4 * batch`` messages are unacked at once.
        ack_wait_s: how long JetStream waits for an ack before redelivering.
        pull_wait_s: how long a pull waits to fill a batch.
        deliver_policy: where a newly created consumer starts (the stream's
            default, all messages, when ``None``); an existing durable resumes.
    """
    config = ConsumerConfig(ack_wait=ack_wait_s, max_ack_pending=4 * batch)
    if deliver_policy is not None:
        config.deliver_policy = deliver_policy

    # Any, not Sequence[Msg]: a broker with FastDepends on (tests' plain NatsBroker)
    # would otherwise validate each nats-py message as a pydantic dataclass.
    async def handle(raws: Any) -> None:
        await handler(raws)

    broker.subscriber(
        subject,
        stream=JStream(stream, declare=False),
        durable=durable,
        config=config,
        pull_sub=PullSub(batch_size=batch, timeout=pull_wait_s, batch=True),
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title=title,
        description=description,
    )(handle)


async def settle_batch[T, R](
    raws: Sequence[Msg],
    *,
    decode: Callable[[bytes], T],
    process: Callable[[list[T]], Awaitable[R]],
    failed: Callable[[], R],
    ident: Callable[[T], str],
    log: Any,
    event: str,
    nak_delay_s: float,
    on_carrier: Callable[[T, Carrier], None] | None = None,
) -> R:
    """
    The body of every batch subscriber: decode, process, then ack or nak the batch.

    A message that does not decode is terminated (redelivery cannot fix it). When
    ``process`` raises (the database is down) the batch is nacked with a delay so
    JetStream redelivers it, and ``failed()`` is returned; the consumers' writes are
    idempotent, so the redelivery is safe. Acks come only after ``process`` returned,
    i.e. after its transaction committed: a crash before the ack loses nothing.

    Args:
        log: a structlog logger; ``{event}.undecodable`` and ``{event}.batch_failed``
            are its lines.
        event: the log event prefix (``dispatch``, ``webhook``, ``channels``).
        ident: the id an operator searches for, of a decoded item.
        on_carrier: called with each decoded item whose message carries a request
            id or trace context (:mod:`delivery.tracing`), and that carrier.
    """
    # Event names are built once; structlog's event is a plain string.
    undecodable, batch_failed = f"{event}.undecodable", f"{event}.batch_failed"
    items: list[T] = []
    good: list[Msg] = []
    for raw in raws:
        try:
            item = decode(raw.data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            log.error(undecodable, subject=raw.subject, error=str(exc))
            await raw.term()
            continue
        items.append(item)
        good.append(raw)
        # Most messages carry only Nats-Msg-Id; those an API request caused carry more.
        if on_carrier is not None and raw.headers and len(raw.headers) > 1:
            found = carrier_of(raw.headers)
            if found is not None:
                on_carrier(item, found)
    if len(good) < len(raws):
        CONSUMER_MESSAGES.labels(event, "terminated").inc(len(raws) - len(good))
    try:
        result = await process(items)
    except Exception:
        log.exception(batch_failed, ids=[ident(i) for i in items], nak_delay_s=nak_delay_s)
        for raw in good:
            await raw.nak(delay=nak_delay_s)
        CONSUMER_MESSAGES.labels(event, "nacked").inc(len(good))
        return failed()
    await ack_all(good)
    if good:
        CONSUMER_MESSAGES.labels(event, "acked").inc(len(good))
    return result
