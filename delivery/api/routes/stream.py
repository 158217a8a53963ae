"""
The live stream: ``GET /api/v1/agents/{agentId}/users/{userId}/notifications/stream``,
Server-Sent Events of each new proactive message for one user.

Source: core NATS ``<prefix>.notification.created`` (the outbox relay publishes it after
the notification row committed), not a database poll. A poll would need a cursor that
follows commit order, and ``created_at`` does not (advance-time stamps simulated fire
times, and concurrent writers commit out of order), while one subscription per process
costs nothing per idle client and delivers in relay order with no poll latency. The
database stays the source of truth for content and for resume: each event's row is read
by id (one query per batch of messages), and ``Last-Event-ID`` replays the user's
pending queue after that id, so nothing the client missed while disconnected is lost.

Per process there is one :class:`StreamHub` (on ``app.state``) and one NATS connection,
opened with the first client and closed with the last. Each client has a bounded queue
(:attr:`StreamConfig.queue_size`): a client that falls that far behind is sent an
``overflow`` event and disconnected instead of buffering without bound; it reconnects
with ``Last-Event-ID`` and the replay catches it up from the database.

Wire format (WHATWG HTML "Server-sent events"): ``id:`` is the message id, ``event:
notification``, ``data:`` the agent-queue entry as JSON; ``: heartbeat`` comments
keep proxies from closing an idle stream.
"""

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final

import nats
import structlog
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from delivery.api.auth import ProjectId
from delivery.api.context import AgentId, ApiContext, Ctx, UserId
from delivery.api.routes.notifications import queue_entry
from delivery.bus.connect import server_urls
from delivery.bus.messages import NotificationCreated
from delivery.bus.subjects import Subjects
from delivery.clock import Clock, SystemClock
from delivery.errors import DeliveryError
from delivery.policy import past_deadline
from delivery.store.notifications import (
    NotificationFeed,
    SqlNotificationStore,
    StoredRow,
    UserKey,
)

router = APIRouter(tags=["stream"])
PATH = "/api/v1/agents/{agent_id}/users/{user_id}/notifications/stream"

LOAD_BATCH: Final = 500
"""Most ids read in one query when many notifications arrive at once."""
MAX_PENDING: Final = 20 * LOAD_BATCH
"""Most message ids waiting for the loader; past it, their listeners are dropped."""

log = structlog.get_logger(__name__)


class StreamUnavailableError(DeliveryError):
    """The process has no NATS connection to follow new notifications with."""

    code: ClassVar[str] = "STREAM_UNAVAILABLE"
    status: ClassVar[int] = 503


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """
    Tunables; ``app.state.stream_config`` overrides the defaults (tests, benchmarks).

    Attributes:
        heartbeat_s: seconds between ``: heartbeat`` comments on an idle stream.
        queue_size: events buffered per client before it is dropped as too slow.
        replay_limit: most pending messages replayed per connection on a
            ``Last-Event-ID`` resume (one page; the client reconnects for the next).
        retry_ms: the reconnection delay suggested to ``EventSource`` clients.
        max_clients: streams one process holds at once; past it a new one is 503
            (with the queue bound, this caps the memory streams can take).
    """

    heartbeat_s: float = 15.0
    queue_size: int = 256
    replay_limit: int = 1000
    retry_ms: int = 2000
    max_clients: int = 10_000


_OVERFLOW: Final = object()
"""Queue sentinel: the client was too slow and is being dropped."""


@dataclass(eq=False, slots=True)
class Listener:
    """One connected client: its user and its bounded queue of rows (or the sentinel)."""

    key: UserKey
    queue: asyncio.Queue[object]
    overflowed: bool = False

    def offer(self, row: StoredRow) -> None:
        """Queue ``row``; on a full queue, :meth:`drop` the client instead."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self.drop()

    def drop(self) -> None:
        """Discard what is queued and queue the overflow sentinel: the client must resume."""
        if self.overflowed:
            return
        self.overflowed = True
        # Free the memory at once; the client resumes from the database.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_OVERFLOW)


@dataclass(slots=True)
class StreamHub:
    """
    Routes ``notification.created`` messages to the listeners of their user.

    The NATS subscription exists while at least one listener does. Messages for users
    with no listener cost one dict lookup; the others are loaded in batches by a
    single loader task, which keeps them in arrival order.
    """

    store: NotificationFeed
    nats_url: str
    subjects: Subjects
    clock: Clock = field(default_factory=SystemClock)
    listeners: dict[UserKey, set[Listener]] = field(default_factory=dict)
    _nc: NatsClient | None = None
    _sub: Subscription | None = None
    _pending: list[tuple[str, UserKey]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _loader: asyncio.Task[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _count: int = 0

    @property
    def connected(self) -> int:
        """How many listeners are connected."""
        return self._count

    async def add(self, key: UserKey, queue_size: int, max_clients: int = 10_000) -> Listener:
        """
        Register a listener, connecting to NATS first if it is the first one. The
        subscription is flushed before returning, so every message published after
        this call reaches the listener.

        Raises:
            StreamUnavailableError: NATS cannot be reached, or ``max_clients`` listeners
                are already connected.
        """
        listener = Listener(key, asyncio.Queue(maxsize=queue_size))
        async with self._lock:
            if self._count >= max_clients:
                log.warning("stream.too_many_clients", max_clients=max_clients)
                raise StreamUnavailableError(
                    "", f"this server already holds {max_clients} live streams; retry later"
                )
            if self._nc is None:
                await self._connect()
            self.listeners.setdefault(key, set()).add(listener)
            self._count += 1
        return listener

    async def remove(self, listener: Listener) -> None:
        """Unregister; the last listener out closes the NATS connection."""
        async with self._lock:
            group = self.listeners.get(listener.key)
            if group is not None and listener in group:
                group.discard(listener)
                self._count -= 1
                if not group:
                    del self.listeners[listener.key]
            if self._count == 0:
                await self._disconnect()

    async def _connect(self) -> None:
        try:
            nc = await nats.connect(
                server_urls(self.nats_url),
                name="delivery-sse",
                connect_timeout=5,
                max_reconnect_attempts=-1,
            )
        except Exception as exc:
            # Connection errors from nats-py vary (OSError, its own NoServersError).
            log.warning("stream.nats_unavailable", error=repr(exc))
            raise StreamUnavailableError(
                "", "the live stream is unavailable (no message bus); poll the queue instead"
            ) from exc
        self._sub = await nc.subscribe(self.subjects.notification_created, cb=self._on_message)
        await nc.flush()
        self._nc = nc
        self._loader = asyncio.create_task(self._load_loop(), name="sse-loader")
        log.info("stream.hub_connected", subject=self.subjects.notification_created)

    async def _disconnect(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.wait([self._loader])
            self._loader = None
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
            self._sub = None
            log.info("stream.hub_disconnected")
        self._pending.clear()

    async def _on_message(self, msg: Msg) -> None:
        try:
            created = NotificationCreated.model_validate_json(msg.data)
        except (ValueError, ValidationError) as exc:
            log.warning("stream.undecodable", subject=msg.subject, error=str(exc))
            return
        key = (created.project_id, created.agent_id, created.user_id)
        if key not in self.listeners:
            return
        if len(self._pending) >= MAX_PENDING:
            # The loader is far behind (slow database): bound memory by dropping these
            # listeners; they resume from the database when they reconnect.
            self._drop([key])
            return
        self._pending.append((created.notification_id, key))
        self._wake.set()

    async def _load_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:LOAD_BATCH]
                del self._pending[:LOAD_BATCH]
                try:
                    rows = await self._load([nid for nid, _ in batch])
                except Exception:
                    # A process edge: the database is down. Listeners of these rows
                    # are dropped so that they resume from the database later.
                    log.exception("stream.load_failed", count=len(batch))
                    self._drop({key for _, key in batch})
                    continue
                for nid, key in batch:
                    row = rows.get(nid)
                    if row is None:
                        continue
                    for listener in list(self.listeners.get(key, ())):
                        listener.offer(row)

    async def _load(self, ids: Sequence[str]) -> dict[str, StoredRow]:
        return await self.store.pending_by_id(ids, self.clock.now())

    def _drop(self, keys: Iterable[UserKey]) -> None:
        for key in keys:
            for listener in list(self.listeners.get(key, ())):
                listener.drop()


def sse_event(row: StoredRow) -> bytes:
    """One ``notification`` event; ``id`` is the message id (what ``consume`` takes)."""
    data = json.dumps(queue_entry(row), ensure_ascii=False, separators=(",", ":"))
    return f"id: {row['id']}\nevent: notification\ndata: {data}\n\n".encode()


def _hub(request: Request, ctx: ApiContext) -> StreamHub:
    hub: StreamHub | None = getattr(request.app.state, "stream_hub", None)
    if hub is None:
        # The embedded daemon spawns NATS itself and passes itself as the waker, with
        # the URL it got (``Daemon.nats_url``); split processes set DELIVERY_NATS_URL.
        url = ctx.settings.nats_url or getattr(ctx.waker, "nats_url", None)
        if not isinstance(url, str) or not url:
            raise StreamUnavailableError(
                "", "the live stream needs DELIVERY_NATS_URL; poll the queue instead"
            )
        store = SqlNotificationStore(ctx.store.engine)
        hub = StreamHub(store, url, Subjects(ctx.settings.subject_prefix), ctx.clock)
        request.app.state.stream_hub = hub
    return hub


async def _watch_disconnect(request: Request) -> None:
    # Starlette only notices a vanished client when a write fails (ASGI spec 2.4), which
    # could be a heartbeat away; reading ``http.disconnect`` frees the slot at once.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(
    request: Request,
    listener: Listener,
    backlog: list[StoredRow],
    config: StreamConfig,
    clock: Clock,
) -> AsyncGenerator[bytes]:
    # Two tasks per client: the disconnect watcher and one pending queue get.
    watcher = asyncio.create_task(_watch_disconnect(request))
    getter: asyncio.Task[object] | None = None
    bound = log.bind(project_id=listener.key[0], agent_id=listener.key[1], user_id=listener.key[2])
    try:
        yield f"retry: {config.retry_ms}\n: connected\n\n".encode()
        replayed = {row["id"] for row in backlog}
        for row in backlog:
            if not past_deadline(row["expires_at"], clock.now()):
                yield sse_event(row)
        if len(backlog) >= config.replay_limit:
            # More may be pending than one replay holds: end the stream so the client
            # reconnects at once with the last id it got (EventSource does this by
            # itself) and gets the next page. Memory stays bounded by the page.
            bound.info("stream.replay_paged", replayed=len(backlog))
            yield b"retry: 0\n\n"
            return
        del backlog[:]
        while not watcher.done():
            if getter is None:
                # One get() in flight at a time, kept across heartbeats: nothing to cancel.
                getter = asyncio.create_task(listener.queue.get())
            done, _ = await asyncio.wait(
                [getter, watcher],
                timeout=config.heartbeat_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if getter not in done:
                if not watcher.done():
                    yield b": heartbeat\n\n"
                continue
            item = getter.result()
            getter = None
            if item is _OVERFLOW:
                bound.warning("stream.client_overflow", queue_size=config.queue_size)
                yield (
                    b'event: overflow\ndata: {"reason":"client too slow; '
                    b'reconnect with Last-Event-ID"}\n\n'
                )
                return
            assert isinstance(item, StoredRow)  # noqa: S101 - the queue holds rows or _OVERFLOW
            # A row waits in the queue while the client is slow: its deadline is
            # checked again now, at send time, since the expiry sweep may lag.
            if item["id"] in replayed or past_deadline(item["expires_at"], clock.now()):
                continue
            yield sse_event(item)
    finally:
        # No await here: when Starlette's disconnect listener cancels the response
        # (anyio cancel scope, ASGI spec < 2.4) every await in this block would be
        # cancelled again. The listener is removed by EventStreamResponse instead.
        watcher.cancel()
        if getter is not None:
            getter.cancel()
        bound.debug("stream.closed")


class EventStreamResponse(StreamingResponse):
    """
    ``text/event-stream`` that always closes its generator when the response ends.

    Starlette leaves an abandoned body iterator to garbage collection when the client
    disconnects mid-stream (the failed write raises out of the ``async for``), so the
    generator's ``finally`` (unsubscribe, close the NATS connection) would run late or,
    at interpreter exit, never.
    """

    def __init__(
        self, events: AsyncGenerator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            # Shielded: a server shutdown cancelling this task must not leave the
            # listener registered (and the hub's NATS connection open).
            await asyncio.shield(self._on_close())


@router.get(PATH, response_class=StreamingResponse)
async def stream_notifications(
    agent_id: AgentId,
    user_id: UserId,
    project: ProjectId,
    ctx: Ctx,
    request: Request,
    last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """
    Server-Sent Events: each new pending message for this user as it is created.

    Send ``Last-Event-ID`` (browsers do on reconnect) to first replay the pending
    messages queued after that message; when more than ``replay_limit`` are pending the
    stream ends after one page, and reconnecting with the last id gets the next page.
    503 ``STREAM_UNAVAILABLE`` when this process has no message bus or holds
    ``max_clients`` streams already.
    """
    config: StreamConfig = getattr(request.app.state, "stream_config", None) or StreamConfig()
    hub = _hub(request, ctx)
    key = (project, agent_id, user_id)
    # Subscribe before reading the backlog: a message committed in between is then in
    # both, and the replayed-id check drops the second copy instead of losing it.
    listener = await hub.add(key, config.queue_size, config.max_clients)
    try:
        # The user's pending messages after that id in queue order; an id that is not
        # this user's (unknown, or consumed and gone) replays the whole pending queue:
        # the client dedupes on the event id, and a gap would be worse.
        backlog = (
            await hub.store.pending_after(key, last_event_id, config.replay_limit, ctx.clock.now())
            if last_event_id is not None
            else []
        )
    except BaseException:
        await hub.remove(listener)
        raise
    log.debug("stream.opened", user_id=user_id, agent_id=agent_id, replayed=len(backlog))
    return EventStreamResponse(
        _events(request, listener, backlog, config, ctx.clock), lambda: hub.remove(listener)
    )
