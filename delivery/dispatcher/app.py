"""
The dispatcher process: FastStream NATS broker, durable JetStream batch pull consumers.

Entry point for the daemon (``delivery run`` / ``delivery dispatcher``)::

    dispatcher = Dispatcher(settings, engine, nats_url=url, clock=clock)
    await dispatcher.start()   # connect, ensure the stream, start the consumers
    ...
    await dispatcher.stop()    # finish in-flight batches, close broker and composer

or, as one awaitable that returns once ``stop_event`` is set::

    await run_dispatcher(settings, engine, nats_url, clock, stop_event)

:meth:`Dispatcher.drain` is the bounded mode: without the
consumers running, it pulls what is pending, processes it and returns the
:class:`~delivery.dispatcher.process.BatchResult`.

Subscribers are thin: decode, call :class:`~delivery.dispatcher.process.Processor`,
ack. A message that does not decode is terminated (redelivery cannot fix it);
a processing failure (database down) naks the batch with a delay so JetStream
redelivers it, and the unique ``source_id`` makes the redelivery safe.
"""

import asyncio
from collections.abc import Callable, Sequence
from functools import partial

import nats
import structlog
from faststream.nats import ConsumerConfig, NatsBroker
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery import metrics
from delivery.bus.connect import server_urls
from delivery.bus.consumers import batch_broker, settle_batch, subscribe_batches
from delivery.bus.messages import EventAccepted, FireCreated, WakeupDue
from delivery.bus.stream import ensure_stream, stream_replicas
from delivery.bus.subjects import Subjects
from delivery.clock import Clock
from delivery.dispatcher.composers import Composer, TemplateComposer, build_composer
from delivery.dispatcher.messages import Messages, TemplateBooks
from delivery.dispatcher.policies import Policies
from delivery.dispatcher.process import BatchResult, Processor
from delivery.domain import SourceKind, SourceRef
from delivery.handoff import Handoff
from delivery.settings import Settings
from delivery.store.policy import PolicyStore
from delivery.store.templates import TemplateStore
from delivery.tracing import Carrier

log = structlog.get_logger(__name__)

DURABLES: dict[SourceKind, str] = {
    SourceKind.SCHEDULE: "dispatcher_fire",
    SourceKind.WAKEUP: "dispatcher_wakeup",
    SourceKind.EVENT: "dispatcher_event",
}
"""Durable consumer per source subject, shared by every dispatcher replica."""

LLM_ACK_WAIT_S = 120.0
"""Longer than the slowest LLM batch (batch / concurrency x timeout)."""
TEMPLATE_ACK_WAIT_S = 30.0
"""
A template batch normally commits within seconds, even in a 100k burst; 30 s bounds
how late a message whose first delivery was never acked arrives (a crash).
``dispatch.redelivered`` in a healthy burst used to be FastStream dropping fetched
batches (see :func:`delivery.bus.consumers.normalise_fetch_timeouts`). A
durable created with another value keeps it (consumers are not updated in place).
"""
NAK_DELAY_S = 5.0
"""Back-off before JetStream redelivers a batch whose processing failed."""
TEMPLATE_BATCH = 500
"""Pull size for the template composer: fetch(500)+ack measured at ~11k msgs/s."""
HANDED_BATCH = 2000
"""
Refs taken from the in-process hand-off per batch (template composer). No
fetch or acks bound it, only the write transaction, and every batch pays the
same fixed costs (its reads, its transaction and commit, the trips to the
driver's thread): in a 100k burst larger batches cut the daemon's CPU per fire.
"""
LLM_BATCH = 32
"""Pull size for the LLM composer, so one batch stays well inside :data:`LLM_ACK_WAIT_S`."""
BATCH_WAIT_S = 0.1
"""How long a pull waits to fill a batch: the latency floor of a lone message."""
TEMPLATE_IN_FLIGHT = 3
"""
Batches processed at once per consumer with the template composer. A batch is
mostly waiting (reads, the write lock, acks), so with one batch at a time a burst
ran at the latency of that chain; the next pull overlaps it. ``max_ack_pending``
(4 batches) bounds it too.
"""
LLM_IN_FLIGHT = 1
"""The LLM composer already runs a batch's calls concurrently; one batch at a time."""

_MODELS: dict[SourceKind, type[BaseModel]] = {
    SourceKind.SCHEDULE: FireCreated,
    SourceKind.WAKEUP: WakeupDue,
    SourceKind.EVENT: EventAccepted,
}


_DESCRIPTIONS: dict[SourceKind, str] = {
    SourceKind.SCHEDULE: "A schedule fire becomes one on_recurring_event_due notification.",
    SourceKind.WAKEUP: "A due wakeup becomes one on_wakeup_ready notification (then executed).",
    SourceKind.EVENT: "An accepted trigger event becomes one on_trigger_event notification.",
}
"""AsyncAPI descriptions of the three consumers."""


def _subject(subjects: Subjects, kind: SourceKind) -> str:
    return {
        SourceKind.SCHEDULE: subjects.fire_created,
        SourceKind.WAKEUP: subjects.wakeup_due,
        SourceKind.EVENT: subjects.event_accepted,
    }[kind]


def decode(kind: SourceKind, data: bytes) -> SourceRef:
    """
    The source a message names.

    Raises:
        ValueError: the body is not the subject's payload (pydantic's
            ``ValidationError`` is a ``ValueError``).
    """
    model = _MODELS[kind].model_validate_json(data)
    if isinstance(model, FireCreated):
        return SourceRef(kind, model.fire_id, replace_staged=model.restage, offset_s=model.offset_s)
    if isinstance(model, WakeupDue):
        return SourceRef(kind, model.wakeup_id, offset_s=model.offset_s)
    if isinstance(model, EventAccepted):
        return SourceRef(kind, model.event_id)
    raise ValueError(f"no source in {type(model).__name__}")


def _delivery_count(raw: Msg) -> int:
    try:
        return int(raw.metadata.num_delivered)
    except Exception:  # a message without JetStream metadata (in-memory tests)
        return 1


class Dispatcher:
    """
    Consumes fire / wakeup / event messages and makes their notifications.

    Args:
        settings: ``subject_prefix`` and the composer settings are read.
        engine: the store's engine.
        nats_url: the JetStream server.
        clock: stamps notifications.
        composer: overrides the composer ``settings`` names (tests); the
            dispatcher closes only a composer it built itself. Messages come from
            the project's templates (or the built-in defaults) unless an LLM is
            named, or a composer given: then that composes, retried for
            ``settings.llm_retry_s`` before the templates stand in.
        on_batch: called with every batch's result after its messages are
            acked (metrics, and tests waiting on an event instead of sleeping).
        handoff: the scheduler and the API of this process hand fires and accepted
            events here (:mod:`delivery.handoff`); they are processed in batches as those of
            JetStream are, sharing their in-flight limit, and their held outbox
            entries stamped sent in the batch's write transaction. A batch that
            fails is left to the relay, which publishes it after the grace.
    """

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        nats_url: str,
        clock: Clock,
        composer: Composer | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self.subjects = Subjects(settings.subject_prefix)
        self._own_composer = composer is None
        self.composer = composer if composer is not None else build_composer(settings)
        llm = settings.composer == "llm"
        self.messages = Messages(
            TemplateBooks(TemplateStore(engine), ttl_s=settings.template_cache_s),
            self.composer if llm or not isinstance(self.composer, TemplateComposer) else None,
            retry_s=settings.llm_retry_s,
        )
        self.processor = Processor(
            engine,
            self.composer,
            self.subjects,
            clock,
            messages=self.messages,
            policies=Policies(PolicyStore(engine), ttl_s=settings.template_cache_s),
        )
        self.batch_size = LLM_BATCH if llm else TEMPLATE_BATCH
        self.handed_batch = LLM_BATCH if llm else HANDED_BATCH
        self.in_flight = LLM_IN_FLIGHT if llm else TEMPLATE_IN_FLIGHT
        # An LLM message may take its timeout and then the whole retry budget.
        llm_wait = max(LLM_ACK_WAIT_S, 2 * (settings.llm_timeout_s + settings.llm_retry_s))
        self.ack_wait_s = llm_wait if llm else TEMPLATE_ACK_WAIT_S
        self._slots = asyncio.Semaphore(self.in_flight)
        self._batches: set[asyncio.Task[BatchResult]] = set()
        self.nats_url = nats_url
        self.broker = self._build_broker()
        self._started = False
        self._on_batch = on_batch
        self.handoff = handoff
        self._local: asyncio.Task[None] | None = None

    def _build_broker(self) -> NatsBroker:
        broker = batch_broker(server_urls(self.nats_url), graceful_timeout=30.0)
        for kind in SourceKind:
            self._subscribe(broker, kind)
        return broker

    def _subscribe(self, broker: NatsBroker, kind: SourceKind) -> None:
        async def handle(raws: Sequence[Msg]) -> None:
            # Returns once the batch has a slot, so the subscriber pulls the next
            # batch while this one is processed; acks follow each batch's commit.
            await self._slots.acquire()
            task = asyncio.create_task(self._handle_batch(kind, raws))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

        subscribe_batches(
            broker,
            subject=_subject(self.subjects, kind),
            stream=self.subjects.stream,
            durable=DURABLES[kind],
            batch=self.batch_size,
            ack_wait_s=self.ack_wait_s,
            pull_wait_s=BATCH_WAIT_S,
            handler=handle,
            title=f"dispatcher:{kind.value}",
            description=_DESCRIPTIONS[kind],
        )

    def _batch_done(self, task: "asyncio.Task[BatchResult]") -> None:
        self._batches.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            # Processing errors are handled inside; this is an ack that failed
            # (connection lost): JetStream redelivers after ack_wait, deduped.
            log.error("dispatch.batch_crashed", error=repr(task.exception()))

    async def _handle_batch(self, kind: SourceKind, raws: Sequence[Msg]) -> BatchResult:
        """Decode, process, ack: the whole subscriber (errors stop here: a process edge)."""
        redelivered = sum(1 for raw in raws if _delivery_count(raw) > 1)
        if redelivered:
            metrics.DISPATCH_REDELIVERED.labels(kind.value).inc(redelivered)
            # JetStream sent these before and got no ack within ack_wait (a crash,
            # or a batch lost in the client): the unique source_id absorbs them, but their
            # notifications are late by ack_wait, which an operator should see.
            log.warning("dispatch.redelivered", kind=kind.value, messages=redelivered)
        # Filled by settle_batch for the messages an API request caused (few).
        carriers: dict[str, Carrier] = {}
        result = await settle_batch(
            raws,
            decode=partial(decode, kind),
            process=partial(self.processor.process, carriers=carriers),
            failed=BatchResult,
            ident=lambda ref: ref.id,
            log=log,
            event="dispatch",
            nak_delay_s=NAK_DELAY_S,
            on_carrier=lambda ref, found: carriers.__setitem__(ref.id, found),
        )
        _count(result)
        if self._on_batch is not None:
            self._on_batch(result)
        return result

    async def _consume_local(self, handoff: Handoff) -> None:
        """Take the handed-off sources in batches until the queue is closed and empty."""
        while refs := await handoff.take(self.handed_batch, BATCH_WAIT_S):
            await self._slots.acquire()
            task = asyncio.create_task(self._handle_local(refs))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    async def _handle_local(self, refs: list[SourceRef]) -> BatchResult:
        """One handed-off batch: process and stamp (errors stop here: a process edge)."""
        assert self.handoff is not None  # noqa: S101 - only started with one
        # The request ids and traces of handed events, as settle_batch finds them in
        # the headers of JetStream messages.
        carriers = self.handoff.carriers_of(refs)
        try:
            result = await self.processor.process(refs, carriers=carriers or None, handed=True)
        except Exception:
            # Nothing committed: the held outbox rows stay unsent and the relay
            # publishes them when the grace ends, as if the process had died.
            metrics.DISPATCH_HANDED.labels("failed").inc(len(refs))
            log.exception(
                "dispatch.batch_failed",
                ids=[r.id for r in refs],
                relayed_in_s=self.handoff.grace.total_seconds(),
            )
            return BatchResult()
        finally:
            # Stamped, or left to the relay: either way no longer this queue's to clear.
            self.handoff.done(len(refs))
        metrics.DISPATCH_HANDED.labels("processed").inc(len(refs))
        _count(result)
        if self._on_batch is not None:
            self._on_batch(result)
        return result

    async def start(self) -> None:
        """Connect, make sure the stream exists, start the three durable consumers."""
        await self.broker.connect()
        state = self.broker.config.connection_state
        await ensure_stream(state.stream, self.subjects, replicas=stream_replicas(state.connection))
        await self.broker.start()
        if self.handoff is not None:
            self._local = asyncio.create_task(
                self._consume_local(self.handoff), name="dispatcher-handoff"
            )
        self._started = True
        log.info("dispatcher.started", stream=self.subjects.stream, batch_size=self.batch_size)

    async def idle(self, *, timeout_s: float | None = None) -> None:
        """Wait until no batch is being processed (or ``timeout_s`` passed)."""
        while self._batches:
            _, pending = await asyncio.wait(set(self._batches), timeout=timeout_s)
            if pending:
                return

    async def stop(self) -> None:
        """Stop consuming, wait for in-flight batches (up to 30 s), close everything."""
        # Stop pulling first and let the batches in flight commit and ack over the
        # still-open connection; the broker then closes it.
        if self.handoff is not None:
            # No new fires are handed over; those queued are processed now, so the
            # relay need not publish them after the grace on the next start.
            self.handoff.close()
        for subscriber in self.broker.subscribers:
            await subscriber.stop()
        if self._local is not None:
            try:
                await asyncio.wait_for(self._local, 30.0)
            except TimeoutError:
                log.warning("dispatch.handoff_not_drained", left=len(self.handoff or ()))
            self._local = None
        await self.idle(timeout_s=30.0)
        await self.broker.stop()
        if self._own_composer:
            await self.composer.aclose()
        if self._started:
            log.info("dispatcher.stopped", stream=self.subjects.stream)
        self._started = False

    async def drain(self, *, idle_s: float = 0.5) -> BatchResult:
        """
        Bounded run: process everything pending on the three consumers, then return.

        Uses its own connection and the same durable consumers, so it must not
        run while :meth:`start` is consuming. Returns once a pull on every
        consumer has come back empty after ``idle_s``.
        """
        total = BatchResult()
        nc = await nats.connect(server_urls(self.nats_url))
        try:
            js = nc.jetstream()
            await ensure_stream(js, self.subjects, replicas=stream_replicas(nc))
            for kind in SourceKind:
                sub = await js.pull_subscribe(
                    _subject(self.subjects, kind),
                    durable=DURABLES[kind],
                    stream=self.subjects.stream,
                    config=ConsumerConfig(
                        ack_wait=self.ack_wait_s, max_ack_pending=4 * self.batch_size
                    ),
                )
                while True:
                    try:
                        raws = await sub.fetch(self.batch_size, timeout=idle_s)
                    except (TimeoutError, NatsTimeoutError):
                        break
                    result = await self._handle_batch(kind, raws)
                    total.created += result.created
                    total.failed += result.failed
                    total.duplicates += result.duplicates
                    total.skipped.update(result.skipped)
                    total.fallbacks += result.fallbacks
        finally:
            await nc.close()
        return total


def _count(result: BatchResult) -> None:
    """A batch's outcomes, added once per batch."""
    metrics.inc_each(
        metrics.DISPATCH_MESSAGES,
        {
            "created": len(result.created) - len(result.failed),
            "failed_generation": len(result.failed),
            "duplicate": len(result.duplicates),
            "skipped": len(result.skipped),
        },
    )


async def run_dispatcher(
    settings: Settings,
    engine: AsyncEngine,
    nats_url: str,
    clock: Clock,
    stop_event: asyncio.Event,
) -> None:
    """Run a :class:`Dispatcher` until ``stop_event`` is set, then stop it cleanly."""
    dispatcher = Dispatcher(settings, engine, nats_url=nats_url, clock=clock)
    await dispatcher.start()
    try:
        await stop_event.wait()
    finally:
        await dispatcher.stop()
