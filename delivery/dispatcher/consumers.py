"""
The one consumer shape every NATS subscriber here uses: a durable JetStream batch pull
consumer with manual acks, whose handler receives the raw messages.

The dispatcher and both handler workers subscribe through :func:`subscribe_batches`
and settle each batch with :func:`settle_batch`, so ack policy, decoding and
batching are decided once.
"""

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from faststream import AckPolicy, Context, StreamMessage
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

BatchHandler = Callable[[Sequence[Msg]], Awaitable[object]]
"""Receives one pulled batch; it acks, naks or terminates each message itself."""


async def no_decode(message: StreamMessage[Any]) -> None:
    """
    Skip FastStream's body decoding; handlers validate each raw message themselves.

    FastStream's decoder raises on a JSON content type with a broken body before
    the handler could terminate the message, so a poison message would be
    redelivered forever.
    """
    return None


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

    async def handle(body: Any, message: Annotated[NatsBatchMessage, Context("message")]) -> None:
        await handler(message.raw_message)

    broker.subscriber(
        subject,
        stream=JStream(stream, declare=False),
        durable=durable,
        config=config,
        pull_sub=PullSub(batch_size=batch, timeout=pull_wait_s, batch=True),
        ack_policy=AckPolicy.MANUAL,
        decoder=no_decode,
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
) -> R:
    """
    The body of every batch subscriber: decode, process, then ack or nak the batch.

    A message that does not decode is terminated (redelivery cannot fix it). When
    ``process`` raises (the database is down) the batch is nacked with a delay so
    JetStream redelivers it, and ``failed()`` is returned; the consumers' writes are
    idempotent, so the redelivery is safe. Acks come only after ``process`` returned,
    i.e. after its transaction committed (DESIGN invariant 3).

    Args:
        log: a structlog logger; ``{event}.undecodable`` and ``{event}.batch_failed``
            are its lines.
        event: the log event prefix (``dispatch``, ``webhook``, ``channels``).
        ident: the id an operator searches for, of a decoded item.
    """
    # Event names are built once; structlog's event is a plain string.
    undecodable, batch_failed = f"{event}.undecodable", f"{event}.batch_failed"
    items: list[T] = []
    good: list[Msg] = []
    for raw in raws:
        try:
            items.append(decode(raw.data))
            good.append(raw)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            log.error(undecodable, subject=raw.subject, error=str(exc))
            await raw.term()
    try:
        result = await process(items)
    except Exception:
        log.exception(batch_failed, ids=[ident(i) for i in items], nak_delay_s=nak_delay_s)
        for raw in good:
            await raw.nak(delay=nak_delay_s)
        return failed()
    for raw in good:
        await raw.ack()
    return result
