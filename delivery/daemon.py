"""
The composition root of the long-running parts: scheduler, outbox relay, dispatcher,
handlers and the API, in one process (``delivery run``) or one part per process.

Everything is built here from :class:`~delivery.settings.Settings` and torn down in
reverse order on SIGINT / SIGTERM: the API stops accepting, in-flight ticks finish,
committed outbox rows are flushed, the dispatcher finishes its batches, NATS is
drained and the embedded ``nats-server`` child is stopped. Whatever a SIGKILL
interrupts is recovered on restart: claims are released (SQLite,
one writer) or expire, unsent outbox rows are relayed, and unacked NATS messages
are redelivered.

When the scheduler and the dispatcher run here together with the template composer,
fires go from one to the other through an in-memory queue
(:class:`~delivery.handoff.Handoff`) instead of the relay and JetStream; so do the
trigger events the API accepts when it runs here too. The fire's
``fire.created`` (the event's ``event.accepted``) outbox row is still written in its
transaction, held for a
grace period, and stamped sent in the transaction that writes its notification, so
a SIGKILL in between leaves the row for the relay to publish once the grace ends
(at once on the embedded SQLite: the restarted process releases its predecessor's
held rows). The queue is bounded; what is beyond it takes the JetStream path. On
shutdown the scheduler and the API stop before the dispatcher, which drains the queue.
"""

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import nats
import structlog
import uvicorn
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.connect import ensure_reachable, server_urls
from delivery.bus.stream import ensure_stream, stream_replicas
from delivery.bus.subjects import Subjects
from delivery.clock import Clock, SystemClock
from delivery.datadir import NATS_DIR, prepare_data_dir
from delivery.embedded import EmbeddedNats
from delivery.handoff import Handoff
from delivery.loops import PeriodicLoop
from delivery.ops import (
    HEARTBEAT_S,
    OpsServer,
    Readiness,
    ScrapeGauges,
    database_checks,
    nats_checks,
)
from delivery.outbox import OutboxRelay
from delivery.retention import Retention
from delivery.scheduler import Scheduler
from delivery.settings import Settings
from delivery.startup import (
    bind_port,
    check_secret_key,
    lock_data_dir,
    require_secret_key,
)
from delivery.store.engine import Capabilities, create_engine, is_sqlite
from delivery.store.facts import SCHEDULER_SEEN, FactStore
from delivery.store.gauges import GaugeStore
from delivery.store.outbox import OutboxStore
from delivery.store.policy import EXPIRY_BATCH, expire_due

if TYPE_CHECKING:
    from delivery.dispatcher.process import BatchResult

log = structlog.get_logger(__name__)

OUTBOX_RETENTION = timedelta(days=1)
"""Sent outbox rows are deleted after a day (JetStream's dedupe window is 2 h)."""
SHUTDOWN_FLUSH_S = 10.0
"""How long shutdown waits to publish committed outbox rows before giving up (they stay)."""


EXPIRY_SWEEP_S = 5.0
"""How often the scheduler process moves pending messages past their deadline to expired."""
HANDOFF_CAPACITY = 10_000
"""
Fires waiting for the in-process dispatcher at most (queued, or taken in a batch
not yet written). The
template dispatcher makes a few thousand notifications a second here, so the last of
them waits seconds, well inside the grace; a burst beyond it goes through JetStream.
"""


class Part(StrEnum):
    """The parts a process can run; ``delivery run`` runs them all."""

    API = "api"
    SCHEDULER = "scheduler"
    DISPATCHER = "dispatcher"
    HANDLERS = "handlers"


ALL_PARTS = frozenset(Part)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGINT / SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Runner(Protocol):
    """A part built by another module: started, then stopped on shutdown."""

    async def start(self) -> None:
        """Begin work; return once running."""
        ...

    async def stop(self) -> None:
        """Finish in-flight work and release resources."""
        ...


def _on_stop(
    stack: contextlib.AsyncExitStack, name: str, closer: Callable[[], Awaitable[None]]
) -> None:
    """
    Run ``closer`` when ``stack`` closes, after the parts started later.

    A failure is logged, not raised: one part's fault on the way down must not
    keep the parts started before it from stopping.
    """

    async def close() -> None:
        try:
            await closer()
        except Exception:
            log.exception("shutdown_step_failed", step=name)

    stack.push_async_callback(close)


async def apply_migrations(url: str, settings: Settings) -> None:
    """
    Bring the schema up to date: the store's Alembic migrations (serialised, idempotent).

    The one place the daemon touches the schema, so the mechanism can change
    without touching the composition. ``settings`` name the deployment's key, for a
    migration that seals stored values.
    """
    from delivery.secrets import SecretBox
    from delivery.store.migrate import migrate

    await migrate(url, secrets=partial(SecretBox.for_migration, settings))


class Daemon:
    """
    Runs the chosen parts until :meth:`request_stop` (or a signal) and shuts down cleanly.

    Args:
        settings: the process settings.
        parts: which parts to run (all of them for ``delivery run``).
        clock: the process clock (system clock by default).
        embedded_nats: spawn ``nats-server`` when ``settings.nats_url`` is empty
            (``delivery run`` only; the separate parts require an external NATS).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        parts: frozenset[Part] = ALL_PARTS,
        clock: Clock | None = None,
        embedded_nats: bool = True,
    ) -> None:
        self.settings = settings
        self.parts = parts
        self.clock: Clock = clock or SystemClock()
        self.embedded_nats = embedded_nats
        self.subjects = Subjects(settings.subject_prefix)
        self.stop_event = asyncio.Event()
        self.api_url: str | None = None
        self.ops_url: str | None = None
        """Where ``/health``, ``/ready`` and ``/metrics`` answer when the API is not run."""
        self.nats_url: str | None = None
        self.scheduler: Scheduler | None = None
        self.relay: OutboxRelay | None = None
        self._scheduler_job: PeriodicLoop | None = None
        self._relay_job: PeriodicLoop | None = None
        self.ready = asyncio.Event()
        self._api_socket: socket.socket | None = None

    def request_stop(self) -> None:
        """Begin a clean shutdown (what SIGINT / SIGTERM do)."""
        if not self.stop_event.is_set():
            log.info("shutdown_requested")
        self.stop_event.set()

    def wake(self) -> None:
        """Nudge the scheduler (the API's waker after writes that may make work due sooner)."""
        if self._scheduler_job is not None:
            self._scheduler_job.wake()

    def wake_relay(self) -> None:
        """Nudge the outbox relay alone (the API's waker after it accepted events)."""
        self._wake_relay()

    async def run(self, *, install_signals: bool = True) -> None:
        """Start the parts, wait for a stop request, then stop them in reverse order."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
        stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
            self.ready.set()
            await self.stop_event.wait()
        finally:
            log.info("shutting_down", parts=sorted(p.value for p in self.parts))
            await stack.aclose()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            log.info("stopped")

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        url = settings.resolved_database_url()
        require_secret_key(settings, url)
        embedded_sqlite = is_sqlite(url) and not settings.database_url
        if embedded_sqlite or (not settings.nats_url and self.embedded_nats):
            data_dir = Path(settings.data_dir)
            await asyncio.to_thread(prepare_data_dir, data_dir)
            # Before any side effect: a second instance on this folder stops here.
            lock = lock_data_dir(data_dir)
            stack.callback(lock.release)
        if Part.API in self.parts:
            # Taken now, handed to uvicorn later: a taken port fails before NATS
            # starts or any claim is released, and nobody can take it in between.
            self._api_socket = bind_port(settings.host, settings.port)
            stack.callback(self._api_socket.close)
        else:
            # The same for the ops port of a process without the API.
            ops_socket = bind_port(settings.host, settings.ops_port, setting="DELIVERY_OPS_PORT")
            stack.callback(ops_socket.close)
        await apply_migrations(url, settings)

        nats_url = settings.nats_url
        if not nats_url:
            if not self.embedded_nats:
                raise RuntimeError("DELIVERY_NATS_URL is required for this process")
            server = EmbeddedNats(Path(settings.data_dir) / NATS_DIR)
            # Started from the loop's own thread, not a worker thread: the child is
            # tied to its spawning thread's life (PR_SET_PDEATHSIG), see embedded.py.
            nats_url = server.start()
            _on_stop(stack, "nats-server", lambda: asyncio.to_thread(server.stop))
        self.nats_url = nats_url

        engine = create_engine(url)
        _on_stop(stack, "engine", engine.dispose)
        single_writer = Capabilities.of(engine).single_writer
        await check_secret_key(settings, engine, self.clock.now())

        servers = server_urls(nats_url)
        await ensure_reachable(servers)
        nc = await nats.connect(
            # A comma-separated list seeds the server pool; cluster peers are
            # discovered from the servers' INFO either way.
            servers,
            name=f"delivery-{'-'.join(sorted(self.parts))}",
            max_reconnect_attempts=-1,
        )
        _on_stop(stack, "nats", nc.drain)
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_stream(js, self.subjects, replicas=stream_replicas(nc))

        if Part.SCHEDULER in self.parts or Part.DISPATCHER in self.parts:
            # The relay publishes every outbox row: fires and wakeups (scheduler),
            # notification.created (dispatcher), event.accepted (API).
            relay = OutboxRelay(engine, js, self.clock, batch=settings.claim_batch)
            self.relay = relay

            async def relay_step() -> bool:
                result = await relay.relay_once()
                if result.failed:
                    raise RuntimeError(f"{result.failed} outbox message(s) not acknowledged")
                return result.more

            async def prune_step() -> bool:
                await relay.prune(OUTBOX_RETENTION)
                return False

            relay_job = PeriodicLoop("outbox-relay", relay_step, settings.tick_interval_s)
            self._relay_job = relay_job
            relay_job.start()
            _on_stop(stack, "outbox-relay", self._flush_outbox(relay, relay_job))
            prune = PeriodicLoop("outbox-prune", prune_step, 3600.0)
            prune.start()
            _on_stop(stack, "outbox-prune", prune.stop)

        handoff = self._handoff()
        if single_writer and self.parts & {Part.SCHEDULER, Part.API}:
            # The one process on this database: a fire or an event held for a
            # dispatcher is a killed process's (with or without a hand-off now), and
            # no one will stamp it; publish it now.
            outbox = OutboxStore(engine)
            now = self.clock.now()
            fires = await outbox.release_held(self.subjects.fire_created, now)
            events = await outbox.release_held(self.subjects.event_accepted, now)
            if fires or events:
                log.info("handoff_released", fires=fires, events=events)

        if Part.SCHEDULER in self.parts:
            scheduler = Scheduler(
                engine,
                self.subjects,
                claim_batch=settings.claim_batch,
                max_lateness=timedelta(seconds=settings.max_lateness_s),
                lease=timedelta(seconds=settings.lease_s),
                on_outbox=self._wake_relay,
                lookahead=timedelta(seconds=settings.lookahead_s),
                handoff=handoff,
            )
            self.scheduler = scheduler
            if single_writer:
                # This is the only scheduler on the database, so any claim left
                # is from a killed process.
                await scheduler.release_claims(everyone=True)
            else:
                _on_stop(stack, "release-claims", scheduler.release_claims_quietly)

            async def tick_step() -> bool:
                now = self.clock.now()
                result = await scheduler.tick(now)
                if result.next_release is not None:
                    # A staged fire is published at its instant, not at the
                    # relay's next periodic run.
                    delay = (result.next_release - now).total_seconds()
                    asyncio.get_running_loop().call_later(delay, self._wake_relay)
                return result.more

            job = PeriodicLoop("scheduler-tick", tick_step, settings.tick_interval_s)
            self._scheduler_job = job
            job.start()
            _on_stop(stack, "scheduler-tick", job.stop)
            facts = FactStore(engine)

            async def heartbeat_step() -> bool:
                # Lets a web process's /ready say whether any scheduler runs at all.
                await facts.put(SCHEDULER_SEEN, scheduler.instance_id, self.clock.now())
                return False

            heartbeat = PeriodicLoop("scheduler-heartbeat", heartbeat_step, HEARTBEAT_S)
            heartbeat.start()
            _on_stop(stack, "scheduler-heartbeat", heartbeat.stop)
            # History older than the retention goes in short batches, beside the tick
            # rather than in it: a prune never delays a fire.
            retention = Retention.from_settings(settings, engine, self.clock)
            pruning = PeriodicLoop("retention-prune", retention.step, settings.retention_interval_s)
            pruning.start()
            _on_stop(stack, "retention-prune", pruning.stop)

            async def expiry_step() -> bool:
                # Messages past their deadline leave the queue; the handlers check the
                # deadline themselves, so this only bounds how long one is listed.
                return len(await expire_due(engine, self.clock.now())) >= EXPIRY_BATCH

            expiry = PeriodicLoop("notification-expiry", expiry_step, EXPIRY_SWEEP_S)
            expiry.start()
            _on_stop(stack, "notification-expiry", expiry.stop)
            await self._start_job_sweep(stack, engine, single_writer=single_writer)

        if Part.DISPATCHER in self.parts:
            from delivery.dispatcher.app import Dispatcher

            dispatcher = Dispatcher(
                settings,
                engine,
                nats_url=nats_url,
                clock=self.clock,
                on_batch=self._dispatched,
                handoff=handoff,
            )
            await dispatcher.start()
            _on_stop(stack, "dispatcher", dispatcher.stop)
            if handoff is not None and Part.SCHEDULER in self.parts:
                # The scheduler stops handing fires over before the dispatcher
                # drains its queue (stopping a loop twice is harmless).
                _on_stop(stack, "scheduler-tick", job.stop)

        if Part.HANDLERS in self.parts:
            await self._start_handlers(stack, engine, nats_url)

        readiness, gauges = self._ops(engine, nc, js)
        if Part.API in self.parts:
            # The API stops before the dispatcher (the stack unwinds in reverse):
            # its last events are handed over before the queue is closed and drained.
            await self._start_api(stack, engine, readiness, gauges, handoff)
        else:
            ops = OpsServer(
                ops_socket,
                readiness,
                [gauges],
                token=settings.ops_token.get_secret_value() if settings.ops_token else None,
            )
            await ops.start()
            self.ops_url = f"http://{settings.host}:{ops.port}"
            _on_stop(stack, "ops", ops.stop)
        log.info(
            "daemon_started",
            parts=sorted(p.value for p in self.parts),
            nats_url=nats_url,
            database=engine.url.render_as_string(hide_password=True),
        )

    def _ops(
        self, engine: AsyncEngine, nc: NatsClient, js: JetStreamContext
    ) -> tuple[Readiness, ScrapeGauges]:
        """What ``/ready`` checks and ``/metrics`` measures for the parts this process runs."""
        from delivery.dispatcher.app import DURABLES
        from handlers.channels_worker import DURABLE as CHANNELS
        from handlers.webhooks.worker import DURABLE as WEBHOOKS

        consumers: list[str] = []
        if Part.DISPATCHER in self.parts:
            consumers.extend(DURABLES.values())
        if Part.HANDLERS in self.parts:
            consumers.extend((WEBHOOKS, CHANNELS))
        store = GaugeStore(engine)
        stream = self.subjects.stream
        readiness = Readiness(database_checks(store))
        readiness.add(nats_checks(nc, js, stream, consumers))
        gauges = ScrapeGauges(
            store,
            self.clock,
            # The scheduler owns the work that waits in the database: one exporter of
            # the backlog per deployment kind is enough.
            work=Part.SCHEDULER in self.parts,
            js=js,
            stream=stream,
            consumers=consumers,
        )
        return readiness, gauges

    async def _start_job_sweep(
        self, stack: contextlib.AsyncExitStack, engine: AsyncEngine, *, single_writer: bool
    ) -> None:
        """Rerun ``async: true`` advance-time jobs whose runner died before committing."""
        from delivery.dispatcher.composers import build_composer
        from delivery.workbench import JOB_SWEEP_S, new_owner, release_jobs, resume_stalled_jobs

        if single_writer:
            # The one process on this database: a lease left is a killed process's.
            await release_jobs(engine)
        owner = new_owner("scheduler")

        async def sweep_step() -> bool:
            composer = partial(build_composer, self.settings)
            await resume_stalled_jobs(engine, composer, self.subjects, self.clock, owner=owner)
            return False

        sweep = PeriodicLoop("advance-time-jobs", sweep_step, JOB_SWEEP_S)
        sweep.start()
        _on_stop(stack, "advance-time-jobs", sweep.stop)

    def _handoff(self) -> Handoff | None:
        """
        The queue to the dispatcher, when it runs here with the scheduler or the API
        (fires, accepted events) and the template composer: an LLM batch can take
        longer than the outbox row's grace.
        """
        if (
            Part.DISPATCHER not in self.parts
            or not self.parts & {Part.SCHEDULER, Part.API}
            or self.settings.composer == "llm"
        ):
            return None
        from delivery.dispatcher.app import TEMPLATE_ACK_WAIT_S

        # The grace is the time JetStream gives a fetched batch before it is sent
        # again: a crash costs a handed-off fire the lateness it costs a fetched one.
        return Handoff(HANDOFF_CAPACITY, timedelta(seconds=TEMPLATE_ACK_WAIT_S))

    # --- steps ------------------------------------------------------------------

    def _wake_relay(self) -> None:
        if self._relay_job is not None:
            self._relay_job.wake()

    def _dispatched(self, result: "BatchResult") -> None:
        # The batch committed notification.created outbox rows: hand them on now, not
        # at the relay's next periodic pass (tick_interval_s later).
        if result.created:
            self._wake_relay()

    @staticmethod
    def _flush_outbox(relay: OutboxRelay, job: PeriodicLoop) -> Callable[[], Awaitable[None]]:
        async def flush() -> None:
            await job.stop()
            try:
                result = await asyncio.wait_for(relay.drain(), SHUTDOWN_FLUSH_S)
                log.info("outbox_flushed", published=result.published, failed=result.failed)
            except TimeoutError:
                log.warning("outbox_flush_timeout", timeout_s=SHUTDOWN_FLUSH_S)
            finally:
                # Before the connection drains (registered earlier, so stopped later).
                await relay.aclose()

        return flush

    # --- parts owned by other modules ---------------------------------------------

    async def _start_handlers(
        self, stack: contextlib.AsyncExitStack, engine: AsyncEngine, nats_url: str
    ) -> None:
        from handlers.runner import build_handlers

        runner: Runner = build_handlers(self.settings, engine, nats_url=nats_url, clock=self.clock)
        await runner.start()
        _on_stop(stack, "handlers", runner.stop)

    async def _start_api(
        self,
        stack: contextlib.AsyncExitStack,
        engine: AsyncEngine,
        readiness: Readiness,
        gauges: ScrapeGauges,
        handoff: Handoff | None,
    ) -> None:
        from delivery.api import create_app
        from delivery.api.auth import bootstrap_key
        from delivery.api.serving import server_config
        from delivery.store.sql import SqlStore

        store = SqlStore(engine, subjects=self.subjects)
        await bootstrap_key(self.settings, store, self.clock)
        app = create_app(
            self.settings,
            store,
            self.clock,
            self,
            readiness=readiness,
            gauges=[gauges],
            handoff=handoff,
        )
        server = _Server(server_config(app, self.settings, lifespan="on"))
        sockets = [self._api_socket] if self._api_socket is not None else None
        task = asyncio.create_task(server.serve(sockets=sockets), name="api")

        async def stop_api() -> None:
            server.should_exit = True
            await task

        _on_stop(stack, "api", stop_api)
        while not server.started:
            if task.done():
                task.result()  # re-raise why it could not start (port in use, ...)
                raise RuntimeError("the API server exited during start-up")
            await asyncio.sleep(0.05)
        # The real port (0 in settings means "any free port": tests use that).
        port = self.settings.port
        for srv in server.servers:
            for sock in srv.sockets:
                port = sock.getsockname()[1]
        self.api_url = f"http://{self.settings.host}:{port}"
        # If the API dies on its own, stop the whole process instead of limping on.
        task.add_done_callback(lambda _t: self.request_stop())
