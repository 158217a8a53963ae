"""
Group commit of accepted trigger events.

A storm of ``POST .../events`` used to make one write transaction per request:
on SQLite each one queued for the file's single writer and held it across
several round trips between the event loop and the driver's thread (BEGIN, the
inserts, the idempotency record, COMMIT), so requests were answered one writer
turn at a time. Here a request hands its event (row, outbox message,
idempotency record) to :class:`EventIngest` and waits; one task writes
everything handed in meanwhile in ONE transaction
(:meth:`delivery.store.events.Events.accept_events`) and answers each request
only after that commit. While a batch is written, the next one gathers, so
under load a batch holds as many events as arrived during the previous commit,
and a lone request is written at once (no timer).

Never a 2xx for an event not recorded: a request's future resolves after the
commit, or fails with the batch's exception (the route then answers as it would
have for its own failed write, e.g. 503 when the database is gone). A batch that
meets another writer's lock (SQLite's "database is locked" after its busy timeout,
a PostgreSQL deadlock or lock timeout) is written again whole, after a short
back-off: nothing in it was wrong, and one event at a time would wait out the lock
once per event; a lock still held after the last try is answered 503 with
``Retry-After``, as any request whose write met a lock past its waits is. A batch
refused for one of its rows (an integrity or data error) is
written again one event at a time, so one bad event does not fail its neighbours;
any other fault fails the batch's requests.

In ``delivery run`` the dispatcher runs in this process, and the daemon passes its
:class:`~delivery.handoff.Handoff`: a batch reserves room there before its
transaction, writes the outbox rows of the events it got room for held a grace
period ahead (``available_at``), and after the commit hands those events to the
dispatcher with the request ids and trace contexts their rows carry, instead of
the relay publishing them to JetStream. The dispatcher stamps the held rows sent
with the notifications; a crash in between leaves them to the relay once the grace
ends. Events beyond the queue's room are written as before. Without a hand-off
(``delivery web``) nothing changes.
"""

import asyncio
import contextlib
import contextvars
import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import structlog

from delivery.domain import SourceKind, SourceRef
from delivery.handoff import Handoff
from delivery.store.engine import is_lock_conflict, is_row_refused
from delivery.store.events import EventOutcome, Events, EventWrite
from delivery.tracing import Carrier, loaded

_log = structlog.get_logger(__name__)

MAX_BATCH = 500
"""Events per transaction at most; more wait for the next one."""
LOCK_RETRIES = 3
"""How many times a batch that met another writer's lock is written again, whole."""
LOCK_BACKOFF_S = 0.1
"""The first wait before writing a locked batch again; doubled each time, with jitter."""


type _Waiting = tuple[EventWrite, asyncio.Future[EventOutcome]]


class EventIngest:
    """
    Writes the events handed to :meth:`accept` in batches, one transaction each.

    Args:
        events: the store the batches are written to.
        now: "now" for deciding which idempotency records are live.
        on_commit: called after each committed batch that wrote an event (wakes
            the outbox relay); its faults are logged, never answered.
        max_batch: events per transaction at most.
        handoff: the dispatcher of this process takes the events it has room for
            from here (their outbox rows held); None: every event goes to the relay.
    """

    def __init__(
        self,
        events: Events,
        now: Callable[[], datetime],
        on_commit: Callable[[], None],
        *,
        max_batch: int = MAX_BATCH,
        handoff: Handoff | None = None,
    ) -> None:
        self._events = events
        self._now = now
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._handoff = handoff
        self._queue: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def accept(self, write: EventWrite) -> EventOutcome:
        """Write ``write`` with the others waiting; its outcome once it has committed."""
        future: asyncio.Future[EventOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append((write, future))
        if self._writer is None or self._writer.done():
            # A fresh context: the writer serves every request, and must neither
            # join the first one's unit of work nor log with its request id.
            self._writer = asyncio.create_task(self._write_all(), context=contextvars.Context())
        # A request cancelled meanwhile (its client left) cancels only its
        # future: the batch still commits its event, and answers nobody for it.
        return await future

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """
        Let the batch being written, and what waits behind it, commit (at most
        ``timeout_s``), then stop. Called when the app shuts down, before its engine
        is disposed: a batch cut off mid-write would fail on a closed pool.
        """
        writer = self._writer
        if writer is None or writer.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer), timeout_s)
        except TimeoutError:
            _log.warning("event ingest stopped with a batch unwritten", timeout_s=timeout_s)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._write(batch)
        finally:
            # Only on cancellation (shutdown) can anything be left waiting.
            for _, future in self._queue:
                if not future.done():
                    future.set_exception(RuntimeError("event ingest stopped"))
            self._queue.clear()

    async def _write(self, batch: Sequence[_Waiting]) -> None:
        # Room in the hand-off before the transaction: an event is written held only
        # if the dispatcher will be handed it (else it would wait out the grace).
        grant = _Grant(self._handoff, len(batch))
        try:
            outcomes = await self._attempt(batch, grant)
        except asyncio.CancelledError:
            grant.release()
            # Shutdown, mid-write or mid-back-off: nobody is left to answer them.
            for _, future in batch:
                if not future.done():
                    future.set_exception(RuntimeError("event ingest stopped"))
            raise
        if outcomes is None:
            grant.release()
            return
        if grant.count:
            grant.hand_over(batch[: grant.count], outcomes)
        if any(outcome.written for outcome in outcomes):
            try:
                self._on_commit()
            except Exception as exc:  # the events are durable; a waker fault must not undo that
                _log.warning("waker failed", error=repr(exc))
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def _attempt(
        self, batch: Sequence[_Waiting], grant: "_Grant"
    ) -> list[EventOutcome] | None:
        """
        The batch's outcomes once it has committed (the outbox rows of its first
        ``grant.count`` events held for the hand-off); ``None`` when its requests
        were answered otherwise (each event written alone, or the batch's error).
        """
        for attempt in range(LOCK_RETRIES + 1):
            try:
                now = self._now()
                writes = [w for w, _ in batch]
                if grant.count:
                    until = now + grant.grace
                    writes[: grant.count] = [_held(w, until) for w in writes[: grant.count]]
                return await self._events.accept_events(writes, now)
            except Exception as exc:
                if is_lock_conflict(exc) and attempt < LOCK_RETRIES:
                    # The whole batch again: its transaction rolled back, and each
                    # event alone would wait for the same lock (on SQLite, a busy
                    # timeout per event). Requests arriving meanwhile queue behind it.
                    delay = LOCK_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.0)
                    _log.warning(
                        "event batch met a lock; writing it again",
                        size=len(batch),
                        attempt=attempt + 1,
                        delay_s=round(delay, 3),
                        error=repr(exc),
                    )
                    await asyncio.sleep(delay)
                    continue
                if len(batch) > 1 and is_row_refused(exc):
                    # One row was refused: written alone, the others commit.
                    _log.warning(
                        "event batch refused a row; writing one by one",
                        size=len(batch),
                        error=repr(exc),
                    )
                    # Each event reserves its own room when written alone.
                    grant.release()
                    for one in batch:
                        await self._write([one])
                    return None
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return None
        raise AssertionError("unreachable: the last attempt returns or answers")


def _held(write: EventWrite, until: datetime) -> EventWrite:
    """``write`` with its outbox row held until ``until`` (the relay leaves it till then)."""
    return EventWrite(write.row, {**write.outbox, "available_at": until}, write.record)


class _Grant:
    """A batch's room in the hand-off: handed over or given back, once."""

    def __init__(self, handoff: Handoff | None, wanted: int) -> None:
        self._handoff = handoff
        self.count = handoff.reserve(wanted) if handoff is not None else 0

    @property
    def grace(self) -> timedelta:
        """How far ahead a held row is available to the relay."""
        return self._handoff.grace if self._handoff is not None else timedelta(0)

    def release(self) -> None:
        """Give the room back: the batch committed no held row (or is written apart)."""
        if self.count and self._handoff is not None:
            self._handoff.cancel(self.count)
        self.count = 0

    def hand_over(self, held: Sequence[_Waiting], outcomes: Sequence[EventOutcome]) -> None:
        """Hand the committed held events to the dispatcher, with their requests' carriers."""
        if self._handoff is None:
            return
        refs: list[SourceRef] = []
        carriers: dict[str, Carrier] = {}
        for (write, _), outcome in zip(held, outcomes, strict=False):
            if not outcome.written:
                continue  # a replay: its key's first event was handed (or relayed)
            event_id = str(write.outbox["msg_id"])
            refs.append(SourceRef(SourceKind.EVENT, event_id))
            found = loaded(write.outbox.get("headers"))
            if found:
                carriers[event_id] = found
        self._handoff.put(refs, self.count, carriers)
        self.count = 0
