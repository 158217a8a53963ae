"""
``create_app(settings, store, clock, waker)``: the API's composition root.

Middleware, outermost first: request context (request id, access log, metrics, span)
-> the operator token on ``/metrics`` and the OpenAPI pages (only when
``DELIVERY_OPS_TOKEN`` is set) -> body limit (the body read whole, bounded in size
and time: 413 / 408) -> authentication (401 before anything parses the body) ->
``Idempotency-Key`` -> routes. The operator console (:mod:`delivery.api.console`) is served
at ``/console`` beside them, and ``/docs`` and ``/redoc`` with their assets from the
``fastapi-offline`` package, so all of them work offline.
The app does not own the store's engine: whoever built it disposes of it.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import structlog
from fastapi import FastAPI

from delivery import __version__
from delivery.api.auth import Authenticator, AuthMiddleware, OpsTokenMiddleware
from delivery.api.console import install_console
from delivery.api.context import ApiContext, NoWaker, Wakeable
from delivery.api.dispatch import IndexedRoutes
from delivery.api.errors import install_error_handlers
from delivery.api.idempotency import IdempotencyMiddleware
from delivery.api.ingest import EventIngest
from delivery.api.limits import BodyLimitMiddleware
from delivery.api.metrics import HttpMetrics, RequestContextMiddleware
from delivery.api.openapi import DOCS_PAGES, install_offline_docs, install_openapi
from delivery.api.routes import ROUTERS, events, schedules, wakeups
from delivery.clock import Clock
from delivery.dispatcher.composers import SharedComposer
from delivery.handoff import Handoff
from delivery.ops import Readiness, ScrapeGauges, database_checks, scheduler_check
from delivery.secrets import LazySecretBox
from delivery.settings import Settings
from delivery.store.channels import ChannelStore
from delivery.store.facts import FactStore
from delivery.store.gauges import GaugeStore
from delivery.store.sql import SqlStore
from delivery.store.timeline import SqlTimelineStore
from delivery.store.webhooks import WebhookStore

_log = structlog.get_logger(__name__)


async def purge_idempotency_forever(store: SqlStore, clock: Clock, interval_s: float) -> None:
    """Delete expired ``Idempotency-Key`` records every ``interval_s``; errors are logged."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            purged = await store.idempotency.purge_idempotency(clock.now())
        except Exception as exc:  # a database blip must not end the loop
            _log.warning("idempotency purge failed", error=repr(exc))
        else:
            if purged:
                _log.info("idempotency records purged", count=purged)


def create_app(
    settings: Settings,
    store: SqlStore,
    clock: Clock,
    waker: Wakeable | None = None,
    *,
    auth_cache_ttl_s: float | None = None,
    purge_interval_s: float = 600.0,
    readiness: Readiness | None = None,
    gauges: Sequence[ScrapeGauges] | None = None,
    handoff: Handoff | None = None,
) -> FastAPI:
    """
    Build the FastAPI application.

    Args:
        settings: the process settings (subject prefix, idempotency TTL, body
            size and time bounds, ...).
        store: the store over a migrated database.
        clock: "now" for every write and computation.
        waker: nudged after writes that may make work due sooner (schedule
            create / patch, wakeup create, event accepted); a no-op by default.
        auth_cache_ttl_s: how long a resolved API key is cached in memory (a
            revoked key works at most this long); ``settings.auth_cache_ttl_s``
            by default.
        purge_interval_s: how often the lifespan task deletes expired
            idempotency records (only while served with a lifespan, e.g. uvicorn).
        readiness: the checks ``/ready`` runs; the database and its migrations by
            default (``delivery run`` adds NATS, the stream and the consumers).
        gauges: the scrape-time gauges ``/metrics`` refreshes; ``delivery_database_up``
            by default.
        handoff: the queue to the dispatcher of this process (``delivery run``):
            accepted events it has room for are handed to it instead of the relay
            (:mod:`delivery.api.ingest`); None when the API runs alone.

    Returns:
        The app; OpenAPI docs at ``/docs``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(purge_idempotency_forever(store, clock, purge_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await ctx.ingest.aclose()
            await composer.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="sonzai-delivery",
        version=__version__,
        description="Proactive delivery: schedules, wakeups, trigger events, notifications.",
        # Served by install_offline_docs instead: the same pages with local assets.
        docs_url=None,
        redoc_url=None,
        # The request context middleware makes the request's span and metrics
        # (delivery.tracing, delivery.metrics); FastAPI's own would repeat them, and
        # asking whether a global OpenTelemetry provider is set read the environment
        # three times per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    # Built once here and handed to every route through the context: the secret box
    # (lazily: it may create the key file), and the stores over the app's engine.
    secrets = LazySecretBox(settings)
    composer = SharedComposer(settings)
    app.state.ctx = ctx = ApiContext(
        settings=settings,
        store=store,
        clock=clock,
        waker=waker or NoWaker(),
        secrets=secrets,
        channels=ChannelStore(store.engine, secrets=secrets),
        webhooks=WebhookStore(store.engine),
        composer=composer,
        timeline=SqlTimelineStore(store.engine),
        ingest=EventIngest(store.events, clock.now, lambda: ctx.wake_relay(), handoff=handoff),
    )
    metrics = HttpMetrics()
    app.state.metrics = metrics
    gauge_store = GaugeStore(store.engine)
    if readiness is None:
        readiness = Readiness(database_checks(gauge_store))
    # Said by every API: a web process without any scheduler takes writes that never fire.
    readiness.advise(scheduler_check(FactStore(store.engine), clock))
    app.state.readiness = readiness
    app.state.gauges = list(gauges) if gauges is not None else [ScrapeGauges(gauge_store, clock)]
    first_included = len(app.router.routes)
    for router in ROUTERS:
        app.include_router(router)
    api_routes = [route for router in ROUTERS for route in router.routes]
    # In front of the included routers: one lookup instead of FastAPI asking each
    # router in turn (delivery.api.dispatch); what it does not answer falls through.
    app.router.routes.insert(first_included, IndexedRoutes(api_routes, app.dependency_overrides))
    install_error_handlers(app, ROUTERS)
    install_openapi(app)
    install_offline_docs(app)
    authenticator = Authenticator(
        store,
        clock,
        ttl_s=settings.auth_cache_ttl_s if auth_cache_ttl_s is None else auth_cache_ttl_s,
    )
    install_console(app, ctx, authenticator)
    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(
        IdempotencyMiddleware,
        store=store,
        clock=clock,
        ttl=timedelta(seconds=settings.idempotency_ttl_s),
        secrets=secrets,
        self_recording=[events.SELF_RECORDING, wakeups.SELF_RECORDING, schedules.SELF_RECORDING],
    )
    app.add_middleware(AuthMiddleware, authenticator=authenticator)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if settings.ops_token is not None:
        app.add_middleware(
            OpsTokenMiddleware,
            token=settings.ops_token.get_secret_value(),
            paths=ops_paths(app),
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        routes=api_routes,
    )
    return app


def ops_paths(app: FastAPI) -> frozenset[str]:
    """The operator endpoints ``DELIVERY_OPS_TOKEN`` guards: metrics and the OpenAPI pages."""
    pages = (app.openapi_url, *DOCS_PAGES)
    return frozenset({"/metrics", *(page for page in pages if page)})
