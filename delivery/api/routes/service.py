"""
``/health`` (liveness, database, tzdata; never authenticated) and ``/metrics``
(Prometheus text; open unless ``DELIVERY_OPS_TOKEN`` is set, see ``delivery.api.auth``).
"""

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from delivery.api.context import Ctx
from delivery.api.metrics import HttpMetrics
from delivery.api.schemas import Health
from delivery.tz import tzdata_version

router = APIRouter(tags=["service"])
_log = structlog.get_logger(__name__)


@router.get("/health", responses={200: {"model": Health}, 503: {"model": Health}})
async def health(ctx: Ctx) -> Response:
    """200 when the database answers, 503 when it does not; always names the tzdata version."""
    try:
        await ctx.store.ping()
        database = "ok"
    except Exception as exc:  # any driver failure means "not reachable"
        _log.warning("health check: database unreachable", error=repr(exc))
        database = "unreachable"
    body = Health(
        status="ok" if database == "ok" else "degraded",
        database=database,
        tzdata=tzdata_version(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if database == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, ctx: Ctx) -> Response:
    """Request counts and latencies per route, in the Prometheus text format."""
    registry: HttpMetrics = request.app.state.metrics
    try:
        await ctx.store.ping()
        up = 1.0
    except Exception:  # reported as a gauge, not an error: scrapes must not fail
        up = 0.0
    return PlainTextResponse(
        registry.render({"delivery_database_up": up}),
        media_type="text/plain; version=0.0.4",
    )
