"""
The skeleton every handler worker shares: a durable JetStream consumer of
``notification.created`` that feeds work into the database, and a periodic loop that
claims due work from there under a lease.

A worker subclasses :class:`QueueWorker` and says what a consumed batch does
(:meth:`QueueWorker.handle_batch`) and what one claim pass does
(:meth:`QueueWorker.claim_step`); the connection, the stream, the consumer, the loop
and the order of start and stop live here once. Stopping ends the consumer first (its
in-flight batches finish and ack), then the loop (its pass finishes), then the
worker's own :meth:`QueueWorker.after_stop`.
"""

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar

from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from delivery.bus.connect import server_urls
from delivery.bus.consumers import batch_broker, subscribe_batches
from delivery.bus.stream import ensure_stream, stream_replicas
from delivery.bus.subjects import Subjects
from delivery.clock import Clock
from delivery.loops import PeriodicLoop
from delivery.settings import Settings


class QueueWorker:
    """
    Consumer + claim loop, started and stopped in the right order.

    Class attributes a worker sets:
        name: the loop's name and the ``<name>.worker_started`` log events' prefix.
        durable: the JetStream durable consumer every replica of the worker shares.
        ack_wait_s: how long JetStream waits for a batch's ack before redelivering.
        pull_wait_s: how long a pull waits to fill a batch.
        graceful_timeout_s: how long stopping the consumer waits for in-flight batches.
        deliver_policy: where a newly created consumer starts (None: the stream's start).

    Args:
        settings: the subject prefix and ``tick_interval_s`` are read here.
        clock: "now" for the worker.
        nats_url: the JetStream server; ``None`` runs the claim loop only (work is
            then queued through the worker's own bounded methods, e.g. in tests).
        batch: the pull size.
        poll_interval: the loop's longest sleep when nothing woke it.
        log: the worker's structlog logger (with its ids bound).
    """

    name: ClassVar[str]
    durable: ClassVar[str]
    ack_wait_s: ClassVar[float]
    pull_wait_s: ClassVar[float]
    graceful_timeout_s: ClassVar[float]
    deliver_policy: ClassVar[DeliverPolicy | None] = None

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        nats_url: str | None,
        batch: int,
        poll_interval: timedelta | None,
        log: Any,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.nats_url = nats_url
        self.subjects = Subjects(settings.subject_prefix)
        self.batch = batch
        self.poll_interval_s = (
            poll_interval.total_seconds() if poll_interval else settings.tick_interval_s
        )
        self._log = log
        self._broker: NatsBroker | None = None
        self._loop = PeriodicLoop(f"{self.name}-claims", self.claim_step, self.poll_interval_s, log)

    # --- what a worker defines ------------------------------------------------------

    async def handle_batch(self, raws: Sequence[Msg]) -> Any:
        """Decode, process and settle (ack / nak) one consumed batch."""
        raise NotImplementedError

    async def claim_step(self) -> bool:
        """One claim pass; True when it stopped at a batch bound (more may be due)."""
        raise NotImplementedError

    async def before_start(self) -> None:
        """Prepare before consuming (build clients, release a dead process's claims)."""

    async def after_stop(self) -> None:
        """Release what :meth:`before_start` built, once nothing consumes or claims."""

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare, start the consumer (when there is a NATS URL), then the claim loop."""
        await self.before_start()
        if self.nats_url is not None:
            broker = batch_broker(
                server_urls(self.nats_url), graceful_timeout=self.graceful_timeout_s
            )
            subscribe_batches(
                broker,
                subject=self.subjects.notification_created,
                stream=self.subjects.stream,
                durable=self.durable,
                batch=self.batch,
                ack_wait_s=self.ack_wait_s,
                pull_wait_s=self.pull_wait_s,
                handler=self.handle_batch,
                deliver_policy=self.deliver_policy,
            )
            self._broker = broker
            await broker.connect()
            state = broker.config.connection_state
            await ensure_stream(
                state.stream, self.subjects, replicas=stream_replicas(state.connection)
            )
            await broker.start()
        self._loop.start()
        self._log.info(f"{self.name}.worker_started", consumer=self.nats_url is not None)

    async def stop(self) -> None:
        """Stop consuming (in-flight batches finish), then claiming, then :meth:`after_stop`."""
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None
        await self._loop.stop()
        await self.after_stop()
        self._log.info(f"{self.name}.worker_stopped")

    def wake(self) -> None:
        """Claim now instead of at the next poll (work was queued, a slot freed)."""
        self._loop.wake()
