"""
The outbox relay: publishes committed outbox rows to JetStream and stamps ``sent_at``.

Safe to repeat: every message carries its row's ``msg_id`` as
``Nats-Msg-Id``, so JetStream drops a republished duplicate inside the stream's
duplicate window (:data:`~delivery.bus.subjects.DEDUPE_WINDOW_S`), and the
consumer's unique ``source_id`` absorbs anything older. A crash between publish and
stamp therefore only costs a harmless republish. A batch's messages are all
written, then their acks awaited together (:class:`~delivery.bus.publish.BatchPublisher`;
measured with nats-py's ``publish_async``: ~3k msgs/s awaiting each ack, ~14k batched).
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from nats.js import JetStreamContext

from delivery import metrics
from delivery.bus.publish import BatchPublisher
from delivery.bus.stream import MSG_ID_HEADER
from delivery.clock import Clock
from delivery.store.engine import Engine
from delivery.store.outbox import OutboxStore, RelayStore, UnsentMessage
from delivery.tracing import publish_headers

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class RelayResult:
    """
    What one :meth:`OutboxRelay.relay_once` did.

    Attributes:
        published: rows acknowledged by JetStream and stamped ``sent_at``.
        duplicates: of those, how many JetStream reported as duplicates (already stored).
        failed: rows whose publish failed or timed out; they stay unsent and are retried.
        more: the batch was full, so more rows may be waiting.
    """

    published: int = 0
    duplicates: int = 0
    failed: int = 0
    more: bool = False


class OutboxRelay:
    """
    Moves outbox rows to JetStream in batches.

    The store hands each relay its own batch (:meth:`RelayStore.unsent`: on
    PostgreSQL locked ``FOR UPDATE SKIP LOCKED`` while it is published), so the
    relays of several scheduler replicas split the work instead of all
    publishing everything.

    Args:
        engine: the store's engine; the relay's store
            (:class:`delivery.store.outbox.OutboxStore`) is built on it.
        js: a JetStream context on the deployment's NATS.
        clock: stamps ``sent_at``.
        batch: rows per batch.
        publish_timeout_s: how long to wait for a batch's acks.
        store: the store to use instead of an :class:`OutboxStore` on ``engine``.
    """

    def __init__(
        self,
        engine: Engine,
        js: JetStreamContext,
        clock: Clock,
        *,
        batch: int = 1000,
        publish_timeout_s: float = 10.0,
        store: RelayStore | None = None,
    ) -> None:
        self.store: RelayStore = store or OutboxStore(engine)
        self.js = js
        # The context's own connection: the relay publishes through it, batched.
        self.publisher = BatchPublisher(js._nc)
        self.clock = clock
        self.batch = batch
        self.publish_timeout_s = publish_timeout_s

    async def relay_once(self) -> RelayResult:
        """
        Publish one batch of unsent rows whose ``available_at`` has passed and
        stamp the acknowledged ones.

        Staged notifications whose fire instant has passed are promoted first
        (:func:`delivery.store.staging.promote`), so a ``notification.created`` that
        becomes publishable at that instant never reaches a handler before its
        notification is visible.

        Returns:
            Counts; ``more`` when the batch was full.
        """
        await self.store.promote(self.clock.now())
        async with self.store.unsent(self.clock.now(), self.batch) as batch:
            if not batch.rows:
                return RelayResult()
            result, acked = await self._publish(batch.rows)
            batch.mark_sent(acked, self.clock.now())
        result.more = len(batch.rows) >= self.batch
        return result

    async def drain(self, *, max_batches: int = 100_000) -> RelayResult:
        """Relay until no unsent row is left (or a batch fails); the summed counts."""
        total = RelayResult()
        for _ in range(max_batches):
            one = await self.relay_once()
            total.published += one.published
            total.duplicates += one.duplicates
            total.failed += one.failed
            if not one.more or one.failed:
                break
        return total

    async def aclose(self) -> None:
        """
        Release what the relay holds on its connection (the publisher's reply inbox);
        the connection itself belongs to the caller. Call it once the last batch is
        done (after :meth:`drain` on shutdown): a batch still waiting for acks is
        given up, its rows stay unsent and go out again on the next start.
        """
        await self.publisher.close()

    async def prune(self, older_than: timedelta) -> int:
        """Delete rows sent more than ``older_than`` ago; returns how many."""
        pruned = await self.store.prune(self.clock.now() - older_than)
        if pruned:
            log.info("outbox_pruned", pruned=pruned)
        return pruned

    async def _publish(self, rows: Sequence[UnsentMessage]) -> tuple[RelayResult, list[int]]:
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        for row in rows:
            headers = {MSG_ID_HEADER: row.msg_id}
            if row.headers:
                # Caused by an API request: its request id and trace ride along as
                # headers, for the consumer to log and continue.
                headers.update(publish_headers(row.headers))
                log.debug("outbox.publish", msg_id=row.msg_id, subject=row.subject, **headers)
            messages.append((row.subject, row.payload.encode(), headers))
        futures = await self.publisher.publish(messages)
        done, pending = await asyncio.wait(futures, timeout=self.publish_timeout_s)
        for future in pending:
            # The row stays unsent; a late ack finds no future and is dropped.
            future.cancel()
        self.publisher.forget(pending)
        result = RelayResult()
        acked: list[int] = []
        failed: list[str] = []
        first_error: BaseException | None = None
        for row, future in zip(rows, futures, strict=True):
            if future in done and not future.cancelled() and future.exception() is None:
                acked.append(row.id)
                if future.result():
                    result.duplicates += 1
                continue
            failed.append(row.msg_id)
            if first_error is None and not future.cancelled():
                first_error = future.exception()
        if failed:
            # One line per batch, not per row: an outage fails thousands at once.
            result.failed = len(failed)
            log.warning(
                "outbox_publish_failed",
                failed=len(failed),
                first_msg_id=failed[0],
                error=repr(first_error) if first_error else "timeout",
            )
        result.published = len(acked)
        if result.published - result.duplicates:
            metrics.OUTBOX_MESSAGES.labels("published").inc(result.published - result.duplicates)
        if result.duplicates:
            metrics.OUTBOX_MESSAGES.labels("duplicate").inc(result.duplicates)
        if result.failed:
            metrics.OUTBOX_MESSAGES.labels("failed").inc(result.failed)
        return result, acked
