"""
The write routes a backend calls most, with FastAPI's own checks but not its
per-request dependency solving.

FastAPI's request handler (``fastapi.routing.get_request_handler``) reads the
``Content-Type`` through :class:`email.message.Message`, solves the route's
dependencies one by one (an await, a values dict and an error list each), and
validates every path parameter and the body through its ``ModelField`` wrappers:
~180 us of server CPU per trigger-event POST beyond the route's own work
(``route.get_route_handler()`` called directly on a loaded machine, against
the same endpoint called with its arguments), a tenth of the request.

:class:`BodyRoute` keeps that handler, and in front of it a short path for the
requests that need none of its generality: a JSON body (``Content-Type:
application/json``) that parses and validates, path parameters that validate,
dependencies that take only the request. The checks are FastAPI's own (the
body is parsed by :func:`json.loads`, as Starlette's ``Request.json`` does,
and every value is validated by the route's own ``ModelField``), so a request
that passes them gets the very values FastAPI would have passed; any request
that does not (bad JSON, a field refused, another content type, an id that
does not match) is handed to FastAPI's handler as it is, which answers it
exactly as before (the body read here is given to it again). The OpenAPI
document is built from the route's declaration, which is unchanged.

The short path is also served without FastAPI's ``request_response`` wrapper (two
``AsyncExitStack`` for dependencies with ``yield``, which the short path never
solves, and a second copy of Starlette's exception handling, which the app's
``ExceptionMiddleware`` already applies with the same handlers): ~4% of a
trigger-event storm's busy samples. A request the short path does not take goes
through that wrapper as before.
"""

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.params import Form
from fastapi.routing import APIRoute, APIRouter
from fastapi.telemetry import get_telemetry_data
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from delivery.api.limits import replaying


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the short path calls: every part of the route it can solve itself."""

    call: Callable[..., Awaitable[Any]]
    dependencies: tuple[tuple[str, Callable[[Request], Awaitable[Any]]], ...]
    path_params: tuple[tuple[str, Any], ...]
    """(name, ModelField) of each path parameter."""
    body_name: str
    body_field: Any
    request_name: str | None


def _simple_dependency(dep: Dependant) -> bool:
    """A dependency that takes only the request, as ``Ctx`` and ``ProjectId`` do."""
    return (
        dep.name is not None
        and dep.call is not None
        and inspect.iscoroutinefunction(dep.call)
        and dep.request_param_name is not None
        and not (
            dep.path_params
            or dep.query_params
            or dep.header_params
            or dep.cookie_params
            or dep.body_params
            or dep.dependencies
            or dep.websocket_param_name
            or dep.http_connection_param_name
            or dep.response_param_name
            or dep.background_tasks_param_name
            or dep.security_scopes_param_name
        )
    )


def plan_of(route: APIRoute) -> _Plan | None:
    """
    The short path's plan for ``route``, or None when the route needs more than it
    does (query, header or cookie parameters, a form, dependencies with parameters
    of their own, a response model to serialise: the return must be a ``Response``).
    """
    dependant = route.dependant
    body = route.body_field
    call = dependant.call
    returns = inspect.signature(call).return_annotation if call is not None else None
    if (
        call is None
        or not inspect.iscoroutinefunction(call)
        or not (isinstance(returns, type) and issubclass(returns, Response))
        or body is None
        or isinstance(body.field_info, Form)
        or route._embed_body_fields
        or len(dependant.body_params) != 1
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or not all(_simple_dependency(dep) for dep in dependant.dependencies)
        or any(field.alias != field.name for field in dependant.path_params)
    ):
        return None
    return _Plan(
        call=call,
        dependencies=tuple(
            (dep.name, dep.call)  # type: ignore[misc]  # checked by _simple_dependency
            for dep in dependant.dependencies
        ),
        path_params=tuple((field.name, field) for field in dependant.path_params),
        body_name=dependant.body_params[0].name,
        body_field=body,
        request_name=dependant.request_param_name,
    )


class BodyRoute(APIRoute):
    """
    An :class:`~fastapi.routing.APIRoute` answered by the short path when the
    request allows (see the module's docstring), else by FastAPI's handler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plan = plan_of(self)
        if plan is not None and self.app is not None:
            self.app = _short_path_app(plan, self.app)


def _short_path_app(plan: _Plan, standard: ASGIApp) -> ASGIApp:
    """
    The route's ASGI app: the short path's answer, or ``standard`` (FastAPI's
    ``request_response`` around its handler), given the body the short path read.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # Overridden dependencies and FastAPI's telemetry need its handler. The
        # overrides are read from the app serving the request: since FastAPI 0.165
        # only the route it builds at include time knows the app, not this one.
        if get_telemetry_data() is not None or getattr(
            scope.get("app"), "dependency_overrides", None
        ):
            await standard(scope, receive, send)
            return
        request = Request(scope, receive, send)
        # Kept on the request: an endpoint asking for the body again gets these bytes.
        raw = await request.body()
        values = await _solve(plan, request, raw)
        if values is None:
            await standard(scope, replaying(raw, receive), send)
            return
        response: Response = await plan.call(**values)
        await response(scope, receive, send)

    return app


async def _solve(plan: _Plan, request: Request, raw: bytes) -> dict[str, Any] | None:
    """
    The endpoint's arguments, as FastAPI would solve them, or None when anything
    is not as the short path expects (FastAPI's handler then answers).

    Raises:
        Exception: what a dependency raises, as under FastAPI (which solves the
            dependencies before it validates anything).
    """
    content_type = None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            content_type = value.decode("latin-1")
            break
    if content_type is None or content_type.lower() != "application/json" or not raw:
        return None
    try:
        parsed = json.loads(raw)
    except Exception:
        # Invalid JSON, nesting too deep, ...: FastAPI's handler names it.
        return None
    values: dict[str, Any] = {}
    for name, dependency in plan.dependencies:
        values[name] = await dependency(request)
    path = request.path_params
    for name, field in plan.path_params:
        value, errors = field.validate(path.get(name), {}, loc=("path", name))
        if errors:
            return None
        values[name] = value
    body, errors = plan.body_field.validate(parsed, {}, loc=("body",))
    if errors:
        return None
    values[plan.body_name] = body
    if plan.request_name is not None:
        values[plan.request_name] = request
    return values


def post[F: Callable[..., Any]](router: APIRouter, path: str, **options: Any) -> Callable[[F], F]:
    """``@router.post(path, **options)`` for a :class:`BodyRoute`."""

    def register(endpoint: F) -> F:
        router.add_api_route(
            path, endpoint, methods=["POST"], route_class_override=BodyRoute, **options
        )
        return endpoint

    return register
