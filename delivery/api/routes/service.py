"""
``/health`` (liveness, database, tzdata; never authenticated), ``/ready`` (every
dependency the process needs, 503 naming the failing ones; never authenticated) and
``/metrics`` (Prometheus text; open unless ``DELIVERY_OPS_TOKEN`` is set, see
``delivery.api.auth``).
"""

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from delivery.api.context import Ctx
from delivery.api.metrics import HttpMetrics
from delivery.api.schemas import Health
from delivery.metrics import CONTENT_TYPE
from delivery.ops import Readiness, render_metrics
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


@router.get(
    "/ready",
    responses={
        200: {"description": "Every dependency is usable."},
        503: {"description": "Not ready; `failing` names the dependencies."},
    },
)
async def ready(request: Request) -> Response:
    """200 when every check passes; 503 with ``failing`` naming the ones that did not."""
    readiness: Readiness = request.app.state.readiness
    ok, body = await readiness.run()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Everything the process measures, in the Prometheus text format."""
    registry: HttpMetrics = request.app.state.metrics
    body = await render_metrics(request.app.state.gauges, [registry.registry])
    return Response(body, media_type=CONTENT_TYPE)
