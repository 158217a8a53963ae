"""
What operators ask a process: is it alive (``/health``), can it work (``/ready``),
and what is it doing (``/metrics``).

:class:`Readiness` runs named checks (database, migrations at head, NATS connected,
stream and consumers present) and answers 503 naming each failing one.
:class:`ScrapeGauges` is the prometheus_client collector of the gauges that need a
query: it is refreshed right before each scrape renders (:meth:`ScrapeGauges.refresh`),
the queries themselves living in :mod:`delivery.store.gauges`. :class:`OpsServer` is
the tiny aiohttp server ``delivery scheduler``, ``dispatcher`` and ``handlers`` serve
them on (``DELIVERY_OPS_PORT``); ``run`` and ``web`` serve the same on the API port.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from delivery.clock import Clock
from delivery.metrics import CONTENT_TYPE, exposition
from delivery.store.facts import SCHEDULER_SEEN, Facts
from delivery.store.gauges import GaugeStore, WorkGauges

if TYPE_CHECKING:
    # aiohttp's server half is ~1.6 MB of RSS; only the processes without the API
    # (``delivery scheduler``, ``dispatcher``, ``handlers``) start an OpsServer, so
    # ``delivery run`` and ``web`` never load it (:meth:`OpsServer.start` does).
    from aiohttp import web

log = structlog.get_logger(__name__)

type Check = Callable[[], Awaitable[None]]
"""A readiness check: returns when the dependency is usable, raises (with why) when not."""

CHECK_TIMEOUT_S = 2.0
"""A dependency that has not answered within this is not ready."""
WORK_REFRESH_S = 5.0
"""The work gauges are queried at most this often, however many scrapers there are."""


def operator_credential(authorization: str) -> str | None:
    """The token in ``Bearer <token>``, or the password in ``Basic base64(user:password)``."""
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


class NotReadyError(Exception):
    """A readiness check's failure, with the reason operators see."""


def database_checks(store: GaugeStore) -> dict[str, Check]:
    """The database answers, and its schema is at the shipped migration head."""

    async def migrations() -> None:
        at_head, stored = await store.schema_at_head()
        if not at_head:
            raise NotReadyError(f"schema at revision {stored!r}, not at the shipped head")

    return {"database": store.ping, "migrations": migrations}


SCHEDULER_SILENT_S = 60.0
"""A scheduler beats every :data:`HEARTBEAT_S`; silent this long, none is running."""
HEARTBEAT_S = 15.0


def scheduler_check(facts: Facts, clock: Clock) -> dict[str, Check]:
    """An advisory check: some scheduler beat within :data:`SCHEDULER_SILENT_S`."""

    async def seen() -> None:
        last = await facts.updated_at(SCHEDULER_SEEN)
        if last is None:
            raise NotReadyError(
                "no scheduler has run on this database: schedules and wakeups will not fire"
            )
        silent = (clock.now() - last).total_seconds()
        if silent > SCHEDULER_SILENT_S:
            raise NotReadyError(
                f"no scheduler seen for {silent:.0f} s: schedules and wakeups will not fire"
            )

    return {"scheduler": seen}


def nats_checks(
    nc: NatsClient, js: JetStreamContext, stream: str, consumers: Sequence[str]
) -> dict[str, Check]:
    """NATS is connected, the stream exists and so does each durable consumer named."""

    async def connected() -> None:
        if not nc.is_connected:
            raise NotReadyError("not connected")

    async def stream_present() -> None:
        await js.stream_info(stream)

    async def consumers_present() -> None:
        for durable in consumers:
            await js.consumer_info(stream, durable)

    checks: dict[str, Check] = {"nats": connected, "stream": stream_present}
    if consumers:
        checks["consumers"] = consumers_present
    return checks


@dataclass
class Readiness:
    """
    Named checks; :meth:`run` runs them all at once, each bounded in time.

    Advisory checks are reported beside the others (under ``warnings`` when they
    fail) but never make the process unready: a web process without a scheduler
    still takes writes, it should only say that nothing will fire them.
    """

    checks: dict[str, Check] = field(default_factory=dict)
    advisories: dict[str, Check] = field(default_factory=dict)

    def add(self, checks: Mapping[str, Check]) -> None:
        """More checks (a part adds its own as it starts)."""
        self.checks.update(checks)

    def advise(self, checks: Mapping[str, Check]) -> None:
        """More advisory checks (reported, never failing the process)."""
        self.advisories.update(checks)

    async def run(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``; the body names every check and each failing one's reason."""
        every = {**self.checks, **self.advisories}
        names = list(every)
        results = await asyncio.gather(
            *(self._one(every[name]) for name in names), return_exceptions=False
        )
        outcome = dict(zip(names, results, strict=True))
        failing = sorted(n for n in self.checks if outcome[n] != "ok")
        warnings = sorted(n for n in self.advisories if outcome[n] != "ok")
        body: dict[str, Any] = {
            "status": "ready" if not failing else "not_ready",
            "checks": outcome,
        }
        if failing:
            body["failing"] = failing
            log.warning("ops.not_ready", failing=failing, checks=outcome)
        if warnings:
            body["warnings"] = warnings
        return not failing, body

    @staticmethod
    async def _one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"timed out after {CHECK_TIMEOUT_S} s"
        except Exception as exc:  # any failure means "not usable"; the reason is the answer
            return f"{type(exc).__name__}: {exc}"[:300]
        return "ok"


class ScrapeGauges(Collector):
    """
    The gauges computed at scrape time: ``delivery_database_up``, and optionally the
    waiting work (store) and the JetStream consumers' pending and redelivered counts.

    Args:
        store: the gauge queries.
        clock: "now" for the work gauges.
        work: export the work gauges (the scheduler and ``run`` do; one process
            exporting them is enough for a deployment).
        js: a JetStream context, for the consumer gauges.
        stream: the stream the consumers read.
        consumers: durable names whose lag to export.
    """

    def __init__(
        self,
        store: GaugeStore,
        clock: Clock,
        *,
        work: bool = False,
        js: JetStreamContext | None = None,
        stream: str = "",
        consumers: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.clock = clock
        self.work = work
        self.js = js
        self.stream = stream
        self.consumers = list(consumers)
        self._database_up = 0.0
        self._work: WorkGauges | None = None
        self._work_at = float("-inf")
        self._consumers: dict[str, tuple[int, int, int]] = {}
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Query what the next :meth:`collect` reports; failures become ``up 0`` / gaps."""
        async with self._lock:
            try:
                await asyncio.wait_for(self.store.ping(), CHECK_TIMEOUT_S)
                self._database_up = 1.0
            except Exception:  # reported as a gauge, not an error: scrapes must not fail
                self._database_up = 0.0
            if (
                self.work
                and self._database_up
                and time.monotonic() - self._work_at >= WORK_REFRESH_S
            ):
                try:
                    self._work = await asyncio.wait_for(
                        self.store.work(self.clock.now()), CHECK_TIMEOUT_S * 2
                    )
                    self._work_at = time.monotonic()
                except Exception as exc:
                    log.warning("ops.work_gauges_failed", error=repr(exc))
                    self._work = None
            if self.js is not None and self.consumers:
                self._consumers = await self._consumer_state()

    async def _consumer_state(self) -> dict[str, tuple[int, int, int]]:
        assert self.js is not None  # noqa: S101 - checked by the caller
        found: dict[str, tuple[int, int, int]] = {}
        for durable in self.consumers:
            try:
                info = await asyncio.wait_for(
                    self.js.consumer_info(self.stream, durable), CHECK_TIMEOUT_S
                )
            except Exception as exc:  # a missing consumer is a gap; /ready names it
                log.debug("ops.consumer_info_failed", consumer=durable, error=repr(exc))
                continue
            found[durable] = (
                int(info.num_pending or 0),
                int(info.num_redelivered or 0),
                int(info.num_ack_pending or 0),
            )
        return found

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: the families depend on what the process runs."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """The values of the last :meth:`refresh`."""
        yield GaugeMetricFamily(
            "delivery_database_up",
            "1 when the database answered a trivial query at this scrape, else 0.",
            value=self._database_up,
        )
        if self.work and self._work is not None:
            w = self._work
            yield GaugeMetricFamily(
                "delivery_outbox_backlog",
                "Outbox rows publishable now but not yet published.",
                value=w.outbox_backlog,
            )
            yield GaugeMetricFamily(
                "delivery_outbox_oldest_age_seconds",
                "Age of the oldest publishable unpublished outbox row (0 when none).",
                value=w.outbox_oldest_age_s,
            )
            yield GaugeMetricFamily(
                "delivery_schedules_due_next_minute",
                "Enabled schedules whose next fire is within a minute (overdue included).",
                value=w.schedules_due,
            )
            yield GaugeMetricFamily(
                "delivery_wakeups_due_next_minute",
                "Pending wakeups due within a minute (overdue included).",
                value=w.wakeups_due,
            )
            by_status = GaugeMetricFamily(
                "delivery_notifications",
                "Notification rows by status.",
                labels=["status"],
            )
            for status, count in sorted(w.notifications.items()):
                by_status.add_metric([status], count)
            yield by_status
        if self.js is not None and self.consumers:
            families = (
                (
                    "delivery_jetstream_consumer_pending",
                    "Messages not yet delivered to the consumer.",
                ),
                (
                    "delivery_jetstream_consumer_redelivered",
                    "Messages delivered more than once and not yet acknowledged.",
                ),
                (
                    "delivery_jetstream_consumer_ack_pending",
                    "Messages delivered and awaiting their acknowledgement.",
                ),
            )
            for index, (name, doc) in enumerate(families):
                family = GaugeMetricFamily(name, doc, labels=["consumer"])
                for durable, values in sorted(self._consumers.items()):
                    family.add_metric([durable], values[index])
                yield family


async def render_metrics(gauges: Sequence[ScrapeGauges], registries: Sequence[Any] = ()) -> bytes:
    """Refresh the scrape-time gauges, then render everything this process exports."""
    for g in gauges:
        await g.refresh()
    return exposition(registries, gauges)


class OpsServer:
    """
    ``/health``, ``/ready`` and ``/metrics`` on a port of their own (aiohttp, no access log).

    Args:
        sock: the bound socket to listen on (:func:`delivery.startup.bind_port`).
        readiness: the checks ``/ready`` runs.
        gauges: the scrape-time collectors ``/metrics`` refreshes.
        token: when set, ``/metrics`` requires ``Authorization: Bearer <token>``.
    """

    def __init__(
        self,
        sock: socket.socket,
        readiness: Readiness,
        gauges: Sequence[ScrapeGauges],
        *,
        token: str | None = None,
    ) -> None:
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        self.readiness = readiness
        self.gauges = list(gauges)
        self.token = token
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Serve on the socket."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, self.sock)
        await site.start()
        self._runner = runner
        log.info("ops.listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: "web.Request") -> "web.Response":
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def _ready(self, _request: "web.Request") -> "web.Response":
        from aiohttp import web

        ready, body = await self.readiness.run()
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        if self.token is not None:
            # As on the API port: Bearer or Basic, both sides hashed before the
            # constant-time comparison so its time says nothing of the token's length.
            given = operator_credential(request.headers.get("Authorization", "")) or ""
            expected = hashlib.sha256(self.token.encode()).digest()
            if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected):
                return web.json_response(
                    {
                        "code": "UNAUTHORIZED",
                        "message": "invalid operator token (DELIVERY_OPS_TOKEN)",
                    },
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        body = await render_metrics(self.gauges)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
