"""
The in-process hand-off of fires and trigger events to the dispatcher.

When one process runs both (``delivery run`` with the template composer), a fire
need not travel scheduler -> outbox relay -> JetStream -> dispatcher: the
scheduler still writes its ``fire.created`` outbox row in the fire's transaction,
but with ``available_at`` a grace period ahead, and after the commit hands the
fire to this queue. The dispatcher takes batches from it and stamps those outbox
rows ``sent_at`` in the transaction that writes their notifications. A crash
before that commit leaves the rows unsent; once the grace has passed the relay
publishes them and the dispatcher makes the notifications through JetStream (the
notification's unique source id absorbs a second try).

The queue is bounded: the scheduler reserves room before its transaction and
writes a fire as handed off only if it got a slot, so a burst larger than the
dispatcher keeps up with goes through JetStream as before instead of waiting
here past the grace (and then being composed twice). A taken batch keeps its room
until the dispatcher is done with it (:meth:`Handoff.done`): the bound covers
every handed ref not yet stamped, queued or being processed, so larger batches do
not let more rows wait than the dispatcher clears within the grace. (A batch that
fails gives its room back at once; its rows stay held until the relay publishes
them when the grace ends.)

The API's event ingest does the same for accepted trigger events when it runs in
the dispatcher's process (``delivery run``): their ``event.accepted`` rows are held,
and the events handed over with the request id and trace context their rows carry,
so the notification's logs and spans continue the request's as through JetStream.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import timedelta

from delivery.domain import SourceRef
from delivery.tracing import Carrier


class Handoff:
    """
    A bounded queue of source refs to the dispatcher of the same process.

    Args:
        capacity: refs reserved, queued or taken and not yet done at most;
            reservations beyond it are refused.
        grace: how long a handed-off fire's outbox row waits before the relay may
            publish it (longer than a batch takes to commit).
    """

    def __init__(self, capacity: int, grace: timedelta) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.grace = grace
        self._refs: deque[SourceRef] = deque()
        # Source id -> the request id / trace context of the few refs an API request made.
        self._carriers: dict[str, Carrier] = {}
        self._reserved = 0
        # Refs taken whose batch is not done yet: their rows are still held.
        self._taken = 0
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: nothing more is reserved."""
        return self._closed

    def __len__(self) -> int:
        return len(self._refs)

    def reserve(self, wanted: int) -> int:
        """
        Reserve room for up to ``wanted`` refs; how many were granted (0 when closed).

        The caller writes that many fires as handed off, then calls :meth:`put`
        with the refs it wrote and the grant (or :meth:`cancel` if it wrote none).
        """
        if self._closed or wanted <= 0:
            return 0
        room = self.capacity - len(self._refs) - self._reserved - self._taken
        granted = max(0, min(wanted, room))
        self._reserved += granted
        return granted

    def cancel(self, granted: int) -> None:
        """Give back a grant whose transaction did not commit."""
        self._reserved = max(0, self._reserved - granted)

    def put(
        self,
        refs: Sequence[SourceRef],
        granted: int,
        carriers: Mapping[str, Carrier] | None = None,
    ) -> None:
        """
        Queue the committed ``refs`` (at most ``granted``) and release the grant;
        ``carriers`` (source id -> carrier) go with them to :meth:`carriers_of`.

        Refs put after :meth:`close` are still queued: the consumer drains the
        queue before it stops, and a closed queue only refuses new grants.
        """
        self.cancel(granted)
        if carriers:
            self._carriers.update(carriers)
        if refs:
            self._refs.extend(refs)
            self._ready.set()

    def carriers_of(self, refs: Sequence[SourceRef]) -> dict[str, Carrier]:
        """The carriers put with ``refs`` (taken batch), removed from the queue's keeping."""
        if not self._carriers:
            return {}
        found = {}
        for ref in refs:
            carrier = self._carriers.pop(ref.id, None)
            if carrier is not None:
                found[ref.id] = carrier
        return found

    def close(self) -> None:
        """Refuse new grants; :meth:`take` returns what is left, then an empty batch."""
        self._closed = True
        self._ready.set()

    async def take(self, limit: int, wait_s: float) -> list[SourceRef]:
        """
        The next batch: waits for a first ref, then up to ``wait_s`` for ``limit``.
        Its room is given back by :meth:`done`.

        Returns an empty list only once the queue is closed, nothing is queued and
        no grant is outstanding (a scheduler transaction may still put its refs).
        """
        while not self._refs:
            if self._closed and not self._reserved:
                return []
            self._ready.clear()
            if self._closed:
                # A grant is outstanding: its transaction commits (and puts) or fails
                # (and cancels) shortly; poll rather than add a second event.
                await asyncio.sleep(0.01)
            else:
                await self._ready.wait()
        if len(self._refs) < limit and not self._closed:
            self._ready.clear()
            # A full batch amortises the transaction; the wait bounds a lone fire's latency.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fill(limit), wait_s)
        count = min(limit, len(self._refs))
        self._taken += count
        return [self._refs.popleft() for _ in range(count)]

    def done(self, count: int) -> None:
        """Give back the room of ``count`` taken refs whose batch ended (stamped or failed)."""
        self._taken = max(0, self._taken - count)

    async def _fill(self, limit: int) -> None:
        while len(self._refs) < limit and not self._closed:
            self._ready.clear()
            await self._ready.wait()
