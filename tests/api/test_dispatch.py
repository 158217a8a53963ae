"""
The route index in front of FastAPI's routing picks what FastAPI's routing would, and
the polling read really goes through it (a FastAPI upgrade that stopped calling it
would otherwise only show as a slower benchmark).
"""

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import Receive, Scope, Send

from delivery.api import create_app
from delivery.api.dispatch import IndexedRoutes, request_only
from delivery.api.routes import ROUTERS
from delivery.api.routes.notifications import list_notifications
from delivery.settings import Settings
from tests.api.conftest import Api

ROUTES: list[BaseRoute] = [route for router in ROUTERS for route in router.routes]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _scope(method: str, path: str) -> Scope:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}


def _concrete(template: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, template)


def _first_full(scope: Scope) -> BaseRoute | None:
    """What FastAPI's routing runs: the first route, in the app's order, that fully matches."""
    for route in ROUTES:
        if route.matches(scope)[0] is Match.FULL:
            return route
    return None


def _paths() -> list[str]:
    paths = set()
    for route in ROUTES:
        template = getattr(route, "path", "")
        # Path values that are also literal segments of other routes, to catch an index
        # that tries a literal route before an earlier parameter route (or the reverse).
        for value in ("x1", "notifications", "counts", "events", "schedules", "timeline"):
            paths.add(_concrete(template, value))
        paths.add(_concrete(template, "x1") + "/")
        paths.add(_concrete(template, "x1") + "/extra")
    return sorted(paths)


def _indexed(app: FastAPI) -> IndexedRoutes:
    [indexed] = [r for r in app.router.routes if isinstance(r, IndexedRoutes)]
    return indexed


@pytest.mark.parametrize("method", METHODS)
def test_the_index_picks_the_route_fastapi_would_for_every_path(method: str) -> None:
    indexed = IndexedRoutes(ROUTES, {})
    for path in _paths():
        scope = _scope(method, path)
        match, child = indexed.matches(scope)
        expected = _first_full(scope)
        assert (child.get("route") if match is Match.FULL else None) is expected, (method, path)


def test_the_index_sits_before_the_routers_and_after_fastapis_own_routes(api: Api) -> None:
    app = create_app(Settings(subject_prefix="test"), api.store, api.clock)
    routes = app.router.routes
    position = routes.index(_indexed(app))
    # Before it only FastAPI's own routes (the OpenAPI document), matched first as before;
    # right after it the first included router.
    ours = {getattr(route, "path", None) for route in ROUTES}
    assert not ours & {getattr(route, "path", None) for route in routes[:position]}
    assert type(routes[position + 1]).__name__ == "_IncludedRouter"


def test_only_endpoints_of_the_request_alone_are_called_directly() -> None:
    direct = {route.path for route in ROUTES if isinstance(route, APIRoute) and request_only(route)}
    assert "/api/v1/agents/{agent_id}/notifications" in direct
    for route in ROUTES:
        if isinstance(route, APIRoute) and route.path in direct:
            assert route.dependant.dependencies == []
            assert route.body_field is None


async def test_the_polling_read_is_routed_by_the_index_and_called_directly(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(subject_prefix="test"), api.store, api.clock)
    indexed = _indexed(app)
    handled: list[Any] = []
    handle = indexed.handle

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        handled.append(scope["route"].endpoint)
        await handle(scope, receive, send)

    monkeypatch.setattr(indexed, "handle", spy)
    # FastAPI's request handler must not run for it.
    [route] = [r for r in ROUTES if getattr(r, "endpoint", None) is list_notifications]
    monkeypatch.setattr(route, "handle", None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api.test", headers=api.alpha.headers
    ) as client:
        r = await client.get("/api/v1/agents/a1/notifications", params={"user_id": "u1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"notifications": []}
    assert handled == [list_notifications]


async def test_dependency_overrides_leave_routing_to_fastapi(api: Api) -> None:
    app = create_app(Settings(subject_prefix="test"), api.store, api.clock)
    indexed = _indexed(app)
    scope = _scope("GET", "/api/v1/agents/a1/notifications")
    assert indexed.matches(scope)[0] is Match.FULL
    app.dependency_overrides[object] = object
    assert indexed.matches(scope)[0] is Match.NONE
