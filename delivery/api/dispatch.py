"""
One route lookup per request, for the API's own routes.

FastAPI 0.165 routes a request through each included router in turn: every router
before the one that answers is asked whether it matches (each asks every one of its
routes, and sums the version counters of its sub-routers first), and the one that
does is then matched a second time to run it. With the fifteen routers of
:data:`delivery.api.routes.ROUTERS` that was a fifth of the polling read's server
CPU (``bench/bench_api_cost.py --kind "GET queue" --profile``, py-spy: 13% of busy
samples in matching alone), and it grows with every route added before a hot one.

:class:`RouteIndex` groups the routes by path depth and last segment, so a path is
only tried against the few routes that could match it, in the app's order.
:class:`IndexedRoutes` is a Starlette route (the public ``matches`` / ``handle``
protocol) placed in front of the included routers: it answers only a full match, and
leaves everything else (405, 404, slash redirects, dependency overrides) to FastAPI's
own routing, which then runs exactly as before. The route it picks is the first full
match in the app's order, as FastAPI's routing picks it (``tests/api/test_dispatch.py``
holds the two to the same answer for every route).

A route whose endpoint takes the request alone and returns a response (no
parameters, dependencies or body for FastAPI to solve: the polling read parses its
own query, see :mod:`delivery.api.routes.notifications`) is called directly: FastAPI's
request handler around it (exit stacks, an empty dependency solve, the endpoint
context for error messages) was another 6% of that read, for nothing it uses. Its
exceptions reach the app's ``ExceptionMiddleware`` and the same handlers.
"""

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

UNMATCHED = "unmatched"

type Endpoint = Callable[[Request], Awaitable[Response]]


def _route_path(scope: Scope) -> str:
    """The path the routes see: ``scope["path"]`` less the ``root_path`` it starts with."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _last_literal(template: str) -> str | None:
    """A template's last segment when it is plain text, ``None`` when it holds a parameter."""
    last = template.rpartition("/")[2]
    return None if "{" in last else last


class RouteIndex:
    """
    Routes by (number of ``/``, last segment): the candidates of a path, in the order given.

    A route whose last segment is a parameter is a candidate for every path of its depth;
    one whose last segment is text only for paths ending with that text.
    """

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        by_depth: dict[int, list[tuple[BaseRoute, str | None]]] = {}
        for route in routes:
            path = getattr(route, "path", None)
            if isinstance(path, str):
                by_depth.setdefault(path.count("/"), []).append((route, _last_literal(path)))
        self._any_last: dict[int, tuple[BaseRoute, ...]] = {}
        self._by_last: dict[tuple[int, str], tuple[BaseRoute, ...]] = {}
        for depth, entries in by_depth.items():
            self._any_last[depth] = tuple(r for r, last in entries if last is None)
            for literal in {last for _, last in entries if last is not None}:
                self._by_last[depth, literal] = tuple(
                    r for r, last in entries if last is None or last == literal
                )

    def candidates(self, scope: Scope) -> tuple[BaseRoute, ...]:
        """The routes that may match ``scope``'s path, in the order given."""
        path = _route_path(scope)
        depth = path.count("/")
        found = self._by_last.get((depth, path.rpartition("/")[2]))
        return found if found is not None else self._any_last.get(depth, ())

    def match(self, scope: Scope) -> tuple[BaseRoute | None, Scope]:
        """The first route that fully matches ``scope`` and its child scope, or ``None``."""
        for route in self.candidates(scope):
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child
        return None, {}

    def template(self, scope: Scope) -> str:
        """The matching route's template (a method mismatch still names it), or unmatched."""
        found = UNMATCHED
        for route in self.candidates(scope):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", UNMATCHED))
            if match is Match.PARTIAL and found == UNMATCHED:
                found = str(getattr(route, "path", UNMATCHED))
        return found


def request_only(route: APIRoute) -> Endpoint | None:
    """
    ``route``'s endpoint when FastAPI has nothing to solve for it: an ``async`` function
    of the request alone, declared to return a ``Response``, without dependencies.
    """
    endpoint = route.endpoint
    if route.dependencies or not inspect.iscoroutinefunction(endpoint):
        return None
    signature = inspect.signature(endpoint, eval_str=True)
    parameters = list(signature.parameters.values())
    if len(parameters) != 1 or parameters[0].annotation is not Request:
        return None
    returns = signature.return_annotation
    if not (isinstance(returns, type) and issubclass(returns, Response)):
        return None
    found: Endpoint = endpoint
    return found


class IndexedRoutes(BaseRoute):
    """
    The app's routes behind one :class:`RouteIndex`, as a single Starlette route.

    Args:
        routes: the routes, in the app's order (``APIRoute`` instances; others are left
            to FastAPI's routing).
        dependency_overrides: the app's ``dependency_overrides``, read when a scope
            carries no app; while the serving app holds any overrides, every request
            is left to FastAPI's routing, which applies them.
    """

    def __init__(
        self, routes: Sequence[BaseRoute], dependency_overrides: Mapping[Any, Any]
    ) -> None:
        api_routes = [route for route in routes if isinstance(route, APIRoute)]
        self.index = RouteIndex(api_routes)
        self._overrides = dependency_overrides
        self._direct: dict[int, Endpoint] = {}
        """``id()`` of a route (routes are not hashable) -> its endpoint, to call directly."""
        for route in api_routes:
            endpoint = request_only(route)
            if endpoint is not None:
                self._direct[id(route)] = endpoint

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # The serving app's overrides as they are now (a test may assign a new dict).
        overrides = getattr(scope.get("app"), "dependency_overrides", self._overrides)
        if scope["type"] != "http" or overrides:
            return Match.NONE, {}
        route, child = self.index.match(scope)
        if route is None:
            return Match.NONE, {}
        # APIRoute.matches put the route in the child scope, as FastAPI's routing does.
        return Match.FULL, child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: APIRoute = scope["route"]
        endpoint = self._direct.get(id(route))
        if endpoint is None:
            await route.handle(scope, receive, send)
            return
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        # The included routers answer url_for for these routes.
        raise NoMatchFound(name, path_params)
