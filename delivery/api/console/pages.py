"""
The console's pages under ``/console``: sign in, users, a user, a schedule, webhooks,
an endpoint's attempts, health. Server-rendered (Jinja2, autoescaped), no script
needed; each form carries the session's CSRF token.

Every page reads through the stores and pure code the API uses: the timeline store
and :func:`delivery.explain.explain` for a user's history, the schedule PATCH of
:mod:`delivery.api.routes.schedules` for enable / disable, the cadence engine for the
next fires, the webhook store's ``resend`` / ``recover`` for recovery, and the
``/metrics`` rendering for health. The signed-in key's project filters every read;
an id of another project is the same 404 page as an unknown one.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from delivery.api.auth import Authenticator
from delivery.api.console.figures import FireSamples, read_figures
from delivery.api.console.session import (
    COOKIE,
    MAX_AGE_S,
    PRE_COOKIE,
    Session,
    SessionCodec,
    new_token,
    same_token,
)
from delivery.api.console.words import cadence_words, local_fires
from delivery.api.context import ApiContext, pair_clock
from delivery.api.routes.schedules import effectively_enabled, patch_schedule
from delivery.api.routes.webhooks import mask_auth_header
from delivery.api.schemas import SchedulePatch
from delivery.cadence import EARLIEST, LATEST, format_utc, parse_instant, upcoming
from delivery.errors import DeliveryError, UnauthorizedError
from delivery.explain import explain, parse_window
from delivery.ops import Readiness, render_metrics
from delivery.store.console import ConsoleStore
from delivery.store.schedules import compile_stored
from delivery.store.timeline import PageQuery, Scope
from delivery.store.webhooks import (
    EndpointDisabledError,
    EndpointMissingError,
    MessageEndedError,
)
from delivery.timeline import Order, decode_cursor, encode_cursor, local_time, to_wire

PREFIX = "/console"
HERE = Path(__file__).parent
STATIC = HERE / "static"
TIMELINE_PAGE = 50
"""Timeline entries per page on a user's page."""
PENDING_SHOWN = 20
USERS_SHOWN = 50
ATTEMPTS_SHOWN = 50
EXCERPT = 400
"""Characters of a request or response body shown per attempt."""
NEXT_FIRES = 10
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_log = structlog.get_logger(__name__)
router = APIRouter(prefix=PREFIX, include_in_schema=False)

_NOTICES = {
    "enabled": "Schedule enabled.",
    "disabled": "Schedule disabled: it has no next fire.",
    "resent": "Queued to be sent again.",
    "already": "Already waiting to be sent; nothing queued twice.",
    "recovered": "Recovery queued.",
    "signed_out": "Signed out.",
}
"""Fixed notices a redirect may name (``?notice=``): never text from the URL."""


class SignInRequired(Exception):
    """No valid session: the page sends the browser to sign in."""


class ConsoleNotFound(Exception):
    """Nothing of this project has that id (unknown and foreign ids alike)."""


class CsrfRefused(Exception):
    """A form without the session's CSRF token."""


@dataclass
class ConsoleState:
    """What the pages share, on ``app.state.console``."""

    ctx: ApiContext
    authenticator: Authenticator
    store: ConsoleStore
    env: Environment
    samples: FireSamples = field(default_factory=FireSamples)
    codec: SessionCodec | None = None

    async def sessions(self) -> SessionCodec:
        """The cookie codec, built on first use (the secret box may create its key file)."""
        if self.codec is None:
            self.codec = SessionCodec(await self.ctx.secrets.get())
        return self.codec


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in person: the key's project and the session's CSRF token."""

    project_id: str
    session: Session


def _state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def _render(
    request: Request,
    name: str,
    viewer: Viewer | None,
    status: int = 200,
    **values: Any,
) -> HTMLResponse:
    state = _state(request)
    notice = _NOTICES.get(request.query_params.get("notice", ""))
    body = state.env.get_template(name).render(
        viewer=viewer,
        csrf=viewer.session.csrf if viewer else "",
        notice=notice,
        path=request.url.path,
        **values,
    )
    response = HTMLResponse(body, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    # Only our own stylesheet, no script, never inside another site's frame (the
    # buttons write), forms only back to us.
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


async def _viewer(request: Request) -> Viewer:
    state = _state(request)
    session = (await state.sessions()).open(request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired
    try:
        project = await state.authenticator.project_for(f"Bearer {session.api_key}")
    except UnauthorizedError:
        raise SignInRequired from None
    return Viewer(project_id=project, session=session)


async def _form(request: Request, viewer: Viewer | None) -> dict[str, str]:
    """The urlencoded form, refused unless it carries the session's CSRF token."""
    raw = (await request.body()).decode("utf-8", errors="replace")
    form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    expected = viewer.session.csrf if viewer else request.cookies.get(PRE_COOKIE)
    if not same_token(expected, form.get("csrf")):
        raise CsrfRefused
    return form


def _see_other(url: str, **query: str) -> RedirectResponse:
    target = url + ("?" + urlencode(query) if query else "")
    return RedirectResponse(target, status_code=303)


def _seg(value: str) -> str:
    """An id as one URL path segment."""
    return quote(value, safe="")


def _safe_next(raw: str | None) -> str:
    """Only the console's own paths are followed after sign-in (no open redirect)."""
    if raw and raw.startswith(PREFIX + "/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return PREFIX + "/users"


# --- sign in / out ---------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    """The console's entry: the users page (sign-in first when needed)."""
    return _see_other(PREFIX + "/users")


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_page(request: Request) -> Response:
    """The sign-in form; sets the form's CSRF cookie."""
    token = new_token()
    response = _render(
        request,
        "sign_in.html",
        None,
        token=token,
        next=_safe_next(request.query_params.get("next")),
        error=None,
    )
    _set_cookie(request, response, PRE_COOKIE, token, max_age=3600)
    return response


def _set_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request) -> Response:
    """Check the key; on success set the session cookie and go on."""
    form = await _form(request, None)
    key = form.get("api_key", "").strip()
    state = _state(request)
    try:
        project = await state.authenticator.project_for(f"Bearer {key}")
    except UnauthorizedError:
        token = new_token()
        refused = _render(
            request,
            "sign_in.html",
            None,
            status=401,
            token=token,
            next=_safe_next(form.get("next")),
            error="That API key is not valid (unknown or revoked).",
        )
        _set_cookie(request, refused, PRE_COOKIE, token, max_age=3600)
        return refused
    value, _session = (await state.sessions()).issue(key)
    response = _see_other(_safe_next(form.get("next")))
    _set_cookie(request, response, COOKIE, value, max_age=MAX_AGE_S)
    response.delete_cookie(PRE_COOKIE, path=PREFIX)
    _log.info("console.signed_in", project_id=project)
    return response


@router.post("/sign-out", response_class=HTMLResponse)
async def sign_out(request: Request) -> Response:
    """End the session (the cookie is dropped)."""
    viewer = await _viewer(request)
    await _form(request, viewer)
    response = _see_other(PREFIX + "/sign-in", notice="signed_out")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# --- users -----------------------------------------------------------------------------


@router.get("/users", response_class=HTMLResponse)
async def users(request: Request, agent: str = "", user: str = "") -> Response:
    """Search (agent, user) pairs by id prefix; an exact pair goes to the user's page."""
    viewer = await _viewer(request)
    agent, user = agent.strip()[:128], user.strip()[:128]
    hits = []
    if agent or user:
        hits = await _state(request).store.find_users(
            viewer.project_id, agent_prefix=agent, user_prefix=user, limit=USERS_SHOWN
        )
        exact = [h for h in hits if h.agent_id == agent and h.user_id == user]
        if agent and user and (exact or not hits):
            # An exact pair (or one without schedules: wakeups and events have users too).
            return _see_other(f"{PREFIX}/users/{_seg(agent)}/{_seg(user)}")
    return _render(request, "users.html", viewer, agent=agent, user=user, hits=hits)


def _user_url(agent: str, user: str) -> str:
    return f"{PREFIX}/users/{_seg(agent)}/{_seg(user)}"


@router.get("/users/{agent_id}/{user_id}", response_class=HTMLResponse)
async def user_page(
    request: Request,
    agent_id: str,
    user_id: str,
    cursor: str = "",
    at: str = "",
    window: str = "",
) -> Response:
    """A user's timeline (newest first), explain for an instant, pending queue, schedules."""
    viewer = await _viewer(request)
    ctx = _state(request).ctx
    project = viewer.project_id
    # An advanced pair's rows are dated on its clock: "now" is the pair's, as in the API.
    now = (await pair_clock(ctx, project, agent_id, user_id)).now
    scope = Scope(project, agent_id, user_id, None)
    schedules = await ctx.store.schedules.list_schedules(project, agent_id, user_id)
    error = None
    try:
        after = decode_cursor(cursor, Order.DESC) if cursor else None
    except DeliveryError as exc:
        after, error = None, exc.message
    max_lateness = timedelta(seconds=ctx.settings.max_lateness_s)
    found = await ctx.timeline.page(
        scope,
        PageQuery(
            since=EARLIEST,
            until=LATEST,
            after=after,
            order=Order.DESC,
            limit=TIMELINE_PAGE,
            now=now,
            max_lateness=max_lateness,
        ),
    )
    events = found.events[:TIMELINE_PAGE]
    if not events and not schedules and not cursor:
        pending_probe = await ctx.store.notifications.list_queue(
            project, agent_id, status="pending", user_id=user_id, limit=1
        )
        if not pending_probe:
            raise ConsoleNotFound
    more = None
    if len(found.events) > TIMELINE_PAGE:
        more = encode_cursor(events[-1].key, Order.DESC)
    entries = [to_wire(e, found.zone.name, found.zone.source) for e in events]
    answer = None
    if at:
        try:
            instant = parse_instant(at.strip(), "at")
            span = parse_window(window or None)
            facts = await ctx.timeline.explain_facts(
                scope, at=instant, window=span, now=now, max_lateness=max_lateness
            )
            result = explain(facts)
            zone = result.timezone or found.zone.name
            answer = {
                **result.to_dict(),
                "at": format_utc(instant),
                "local_at": local_time(instant, zone),
                "timezone": zone,
            }
        except DeliveryError as exc:
            error = exc.message
    # As the API's list: a message past its deadline is not shown as pending.
    pending = await ctx.store.notifications.list_queue(
        project,
        agent_id,
        status="pending",
        user_id=user_id,
        limit=PENDING_SHOWN,
        now=ctx.clock.now(),
    )
    rows = [
        {
            "row": s,
            "words": cadence_words(s.cadence_json, s.timezone, s.active_window_json),
            "enabled": effectively_enabled(s, now),
            "next": _next_fire(s, now),
        }
        for s in schedules
    ]
    return _render(
        request,
        "user.html",
        viewer,
        agent_id=agent_id,
        user_id=user_id,
        user_url=_user_url(agent_id, user_id),
        zone=found.zone,
        entries=entries,
        more=more,
        answer=answer,
        at=at,
        window=window,
        error=error,
        pending=[
            {
                **dict(p),
                "utc": format_utc(p["created_at"]),
                "local": local_time(p["created_at"], found.zone.name),
            }
            for p in pending
        ],
        schedules=rows,
        now_utc=format_utc(now),
    )


def _next_fire(row: Any, now: datetime) -> str:
    enabled = effectively_enabled(row, now)
    fire = row.next_fire_at
    if row.staged_fire_at is not None and row.staged_fire_at > now:
        fire = row.staged_fire_at
    return format_utc(fire) if enabled and fire is not None else ""


# --- a schedule ------------------------------------------------------------------------


@router.get("/users/{agent_id}/{user_id}/schedules/{schedule_id}", response_class=HTMLResponse)
async def schedule_page(
    request: Request, agent_id: str, user_id: str, schedule_id: str
) -> Response:
    """A schedule in words, its next fires in its zone (DST changes marked), its history."""
    viewer = await _viewer(request)
    ctx = _state(request).ctx
    row = await ctx.store.schedules.get_schedule(viewer.project_id, agent_id, user_id, schedule_id)
    if row is None:
        raise ConsoleNotFound
    now = (await pair_clock(ctx, viewer.project_id, agent_id, user_id)).now
    enabled = effectively_enabled(row, now)
    fires = local_fires(
        upcoming(compile_stored(row), now, NEXT_FIRES) if enabled else [], row.timezone, now
    )
    found = await ctx.timeline.page(
        Scope(viewer.project_id, agent_id, user_id, schedule_id),
        PageQuery(
            since=EARLIEST,
            until=LATEST,
            after=None,
            order=Order.DESC,
            limit=TIMELINE_PAGE,
            now=now,
            max_lateness=timedelta(seconds=ctx.settings.max_lateness_s),
        ),
    )
    history = [
        to_wire(e, found.zone.name, found.zone.source)
        for e in found.events[:TIMELINE_PAGE]
        if e.kind.value.startswith("fire.")
    ]
    return _render(
        request,
        "schedule.html",
        viewer,
        row=row,
        agent_id=agent_id,
        user_id=user_id,
        user_url=_user_url(agent_id, user_id),
        words=cadence_words(row.cadence_json, row.timezone, row.active_window_json),
        enabled=enabled,
        next_fire_at=_next_fire(row, now),
        fires=fires,
        history=history,
    )


@router.post(
    "/users/{agent_id}/{user_id}/schedules/{schedule_id}/enabled", response_class=HTMLResponse
)
async def set_enabled(request: Request, agent_id: str, user_id: str, schedule_id: str) -> Response:
    """Enable or disable the schedule (the API's PATCH; disabling clears next_fire_at)."""
    viewer = await _viewer(request)
    form = await _form(request, viewer)
    ctx = _state(request).ctx
    if (
        await ctx.store.schedules.get_schedule(viewer.project_id, agent_id, user_id, schedule_id)
        is None
    ):
        raise ConsoleNotFound
    wanted = form.get("enabled") == "true"
    await patch_schedule(
        ctx, viewer.project_id, agent_id, user_id, schedule_id, SchedulePatch(enabled=wanted)
    )
    _log.info(
        "console.schedule_enabled",
        project_id=viewer.project_id,
        schedule_id=schedule_id,
        enabled=wanted,
    )
    url = f"{_user_url(agent_id, user_id)}/schedules/{_seg(schedule_id)}"
    return _see_other(url, notice="enabled" if wanted else "disabled")


# --- webhooks --------------------------------------------------------------------------


@router.get("/webhooks", response_class=HTMLResponse)
async def webhooks(request: Request) -> Response:
    """Endpoints by event type: success rate, last status, disabled state, backlog."""
    viewer = await _viewer(request)
    state = _state(request)
    found = await state.store.endpoints(viewer.project_id)
    box = (
        await state.ctx.secrets.get() if any(h.endpoint["auth_header_enc"] for h in found) else None
    )
    rows = []
    for h in found:
        auth = None
        if h.endpoint["auth_header_enc"] and box is not None:
            auth = mask_auth_header(box.open(h.endpoint["auth_header_enc"]))
        rows.append(
            {"health": h, "auth": auth, "last_at": format_utc(h.last_at) if h.last_at else ""}
        )
    return _render(request, "webhooks.html", viewer, rows=rows)


def _excerpt(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= EXCERPT else text[:EXCERPT] + " …"


@router.get("/webhooks/{event_type}", response_class=HTMLResponse)
async def webhook_page(request: Request, event_type: str, cursor: str = "") -> Response:
    """One endpoint's attempts (newest first) with excerpts; resend and recover."""
    viewer = await _viewer(request)
    state = _state(request)
    endpoint = next(
        (
            h
            for h in await state.store.endpoints(viewer.project_id)
            if h.endpoint["event_type"] == event_type
        ),
        None,
    )
    if endpoint is None:
        raise ConsoleNotFound
    after = int(cursor) if cursor.isascii() and cursor.isdigit() and len(cursor) <= 18 else None
    page = await state.ctx.webhooks.list_attempts(
        viewer.project_id, event_type, page_size=ATTEMPTS_SHOWN, cursor=after
    )
    attempts = [
        {
            "id": a["id"],
            "number": a["attempt_number"],
            "event_id": a["event_id"],
            "status": a["status"],
            "code": a["response_code"],
            "ms": a["duration_ms"],
            "at": format_utc(a["created_at"]),
            "error": a["error_message"] or "",
            "request": _excerpt(a["request_body"]),
            "response": _excerpt(a["response_body"]),
        }
        for a in page.rows
    ]
    return _render(
        request,
        "webhook.html",
        viewer,
        health=endpoint,
        event_type=event_type,
        attempts=attempts,
        more=page.next_cursor,
        default_since=format_utc(state.ctx.clock.now() - timedelta(days=1)),
    )


@router.post("/webhooks/{event_type}/resend", response_class=HTMLResponse)
async def resend(request: Request, event_type: str) -> Response:
    """Send one attempt's message again (the API's resend, idempotent while queued)."""
    viewer = await _viewer(request)
    form = await _form(request, viewer)
    ctx = _state(request).ctx
    try:
        done = await ctx.webhooks.resend(
            viewer.project_id, event_type, form.get("id", ""), now=ctx.clock.now()
        )
    except EndpointMissingError:
        raise ConsoleNotFound from None
    except EndpointDisabledError:
        return await _webhook_error(
            request,
            viewer,
            event_type,
            "The endpoint is disabled: enable it first "
            f"(POST /api/v1/webhooks/{event_type}/enable).",
        )
    except MessageEndedError as exc:
        return await _webhook_error(
            request, viewer, event_type, f"The message is {exc.status}: it is never sent again."
        )
    if done is None:
        raise ConsoleNotFound
    _log.info("console.resend", project_id=viewer.project_id, delivery_id=done.delivery_id)
    return _see_other(
        f"{PREFIX}/webhooks/{_seg(event_type)}", notice="resent" if done.queued else "already"
    )


@router.post("/webhooks/{event_type}/recover", response_class=HTMLResponse)
async def recover(request: Request, event_type: str) -> Response:
    """Queue every failed or missed message since an instant (the API's recover)."""
    viewer = await _viewer(request)
    form = await _form(request, viewer)
    ctx = _state(request).ctx
    now = ctx.clock.now()
    try:
        since = parse_instant(form.get("since", ""), "since")
    except DeliveryError as exc:
        return await _webhook_error(request, viewer, event_type, exc.message)
    if since > now:
        return await _webhook_error(request, viewer, event_type, "since is in the future")
    try:
        await ctx.webhooks.recover(viewer.project_id, event_type, since=since, now=now)
    except EndpointMissingError:
        raise ConsoleNotFound from None
    except EndpointDisabledError:
        return await _webhook_error(
            request,
            viewer,
            event_type,
            "The endpoint is disabled: enable it first "
            f"(POST /api/v1/webhooks/{event_type}/enable).",
        )
    return _see_other(f"{PREFIX}/webhooks/{_seg(event_type)}", notice="recovered")


async def _webhook_error(
    request: Request, viewer: Viewer, event_type: str, message: str
) -> Response:
    return _render(
        request,
        "error.html",
        viewer,
        status=400,
        title="Not done",
        message=message,
        back=f"{PREFIX}/webhooks/{_seg(event_type)}",
    )


# --- health ----------------------------------------------------------------------------


@router.get("/health", response_class=HTMLResponse)
async def health(request: Request) -> Response:
    """The ready checks and live figures from the metrics the service exports."""
    viewer = await _viewer(request)
    state = _state(request)
    readiness: Readiness = request.app.state.readiness
    ready, body = await readiness.run()
    text = await render_metrics(request.app.state.gauges, [request.app.state.metrics.registry])
    figures = read_figures(text.decode())
    last_hour, covered_s = state.samples.add(figures.fires_total)
    endpoints = await state.store.endpoints(viewer.project_id)
    failing = [h for h in endpoints if h.failing]
    return _render(
        request,
        "health.html",
        viewer,
        ready=ready,
        checks=body.get("checks", {}),
        warnings=body.get("warnings", []),
        figures=figures,
        last_hour=int(last_hour),
        covered_min=int(covered_s // 60),
        failing=failing,
        endpoints=len(endpoints),
    )


# --- wiring ----------------------------------------------------------------------------


async def _not_found(request: Request, _exc: Exception) -> Response:
    return _plain_page(request, 404, "Not found", "There is nothing here with that id.")


def _plain_page(request: Request, status: int, title: str, message: str) -> Response:
    return _render(
        request,
        "error.html",
        None,
        status=status,
        title=title,
        message=message,
        back=PREFIX + "/users",
    )


async def _sign_in_first(request: Request, _exc: Exception) -> Response:
    if request.method != "GET":
        return _plain_page(request, 401, "Signed out", "Your session ended; sign in again.")
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _see_other(PREFIX + "/sign-in", next=target)


async def _csrf_refused(request: Request, _exc: Exception) -> Response:
    return _plain_page(
        request,
        403,
        "Refused",
        "The form was not sent from this console (missing or wrong CSRF token); "
        "reload the page and try again.",
    )


def install_console(app: FastAPI, ctx: ApiContext, authenticator: Authenticator) -> None:
    """Serve the console at ``/console`` on ``app`` (its state, routes and error pages)."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["prefix"] = PREFIX
    env.filters["seg"] = _seg
    app.state.console = ConsoleState(
        ctx=ctx, authenticator=authenticator, store=ConsoleStore(ctx.store.engine), env=env
    )
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_exception_handler(ConsoleNotFound, _not_found)
    app.add_exception_handler(SignInRequired, _sign_in_first)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
