"""
Exception handlers: every error leaves as ``{code, message, errors: [{field, message, code}]}``.

FastAPI's 422 ``{"detail": [...]}`` is replaced by 400 ``INVALID_REQUEST`` (or
``INVALID_ID`` for a path id), because the SDK only fills ``exc.code`` from that
shape. A route that does not match because an id holds a ``/`` is
``INVALID_ID`` too (the SDK interpolates ids unescaped).
"""

import re
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from delivery.api.schemas import MAX_METADATA_DEPTH
from delivery.errors import (
    DatabaseUnavailableError,
    DeliveryError,
    InvalidIdError,
    InvalidRequestError,
    NotFoundError,
)
from delivery.store.engine import is_database_unavailable, is_lock_conflict

_log = structlog.get_logger(__name__)


def error_response(exc: DeliveryError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for a :class:`DeliveryError`."""
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) if parts else "body"


def _message(field: str, err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"{field} is not a field of this request"
    if kind == "json_invalid":
        return "the request body is not valid JSON"
    msg = str(err.get("msg", "is invalid"))
    return f"{field}: {msg[:1].lower()}{msg[1:]}"


def validation_error(exc: RequestValidationError) -> tuple[DeliveryError, list[dict[str, str]]]:
    """
    Map FastAPI's validation failure to our error, plus one ``errors`` item per failing field.
    """
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ("body",), "type": "invalid"}
    loc = tuple(first.get("loc", ()))
    field = _field_name(loc)
    if loc and loc[0] == "path":
        bad_id = InvalidIdError(
            field, f"{field} must match [A-Za-z0-9._:@+-]{{1,128}} (no '/', '?' or '#')"
        )
        return bad_id, bad_id.to_body()["errors"]
    if first.get("type") == "json_invalid":
        field = "body"
    error: DeliveryError
    if first.get("type") == "string_pattern_mismatch" and field.endswith("_id"):
        # Every patterned body field is an id (schemas.Ident).
        error = InvalidIdError(field, f"{field} must match [A-Za-z0-9._:@+-]{{1,128}}")
    else:
        error = InvalidRequestError(field, _message(field, first))
    items = []
    for err in errors:
        f = "body" if err.get("type") == "json_invalid" else _field_name(tuple(err.get("loc", ())))
        items.append({"field": f, "message": _message(f, err), "code": error.code})
    return error, items


def _routes_allowing_slashes(
    routers: Sequence[APIRouter],
) -> list[tuple[re.Pattern[str], set[str]]]:
    """Each route's path with every ``{param}`` allowed to span segments."""
    compiled = []
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute):
            continue
        pattern = ""
        for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", route.path_format):
            pattern += re.escape(literal)
            if name:
                pattern += f"(?P<{name}>.+)"
        compiled.append((re.compile(f"^{pattern}$"), set(route.methods or ())))
    return compiled


def install_error_handlers(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Register the handlers on ``app``; ``routers`` are the mounted (prefix-free) routers."""
    slashy = _routes_allowing_slashes(routers)

    async def on_delivery_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DeliveryError)  # noqa: S101 - registered for this type only
        return error_response(exc)

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        error, items = validation_error(exc)
        body = error.to_body()
        body["errors"] = items
        return JSONResponse(body, status_code=error.status)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)  # noqa: S101
        if exc.status_code == 404:
            path = request.url.path
            for pattern, methods in slashy:
                match = pattern.match(path)
                if match and request.method in methods:
                    bad = next((k for k, v in match.groupdict().items() if "/" in v), "id")
                    return error_response(
                        InvalidIdError(
                            bad,
                            f"{bad} must match [A-Za-z0-9._:@+-]{{1,128}}; "
                            "an id containing '/' cannot be used in a path",
                        )
                    )
            return error_response(
                NotFoundError("", f"no route for {request.method} {path}", resource="route")
            )
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            # FastAPI's JSON parse ran out of stack: nesting far past any field's bound.
            return error_response(
                InvalidRequestError(
                    "body",
                    "the request body nests JSON objects or arrays too deeply to parse "
                    f"(metadata may nest at most {MAX_METADATA_DEPTH} levels)",
                )
            )
        if exc.status_code == 405:
            body = {
                "code": "METHOD_NOT_ALLOWED",
                "message": f"{request.method} is not allowed on {request.url.path}",
                "errors": [],
            }
            return JSONResponse(body, status_code=405, headers=exc.headers)
        body = {"code": "HTTP_ERROR", "message": str(exc.detail), "errors": []}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # Already logged with the request id by RequestContextMiddleware.
        if is_database_unavailable(exc):
            # Its transaction died with the connection: nothing of the request was
            # recorded (an Idempotency-Key included), so the client may retry.
            unavailable = DatabaseUnavailableError(
                "", "the database is unavailable for a moment; nothing was recorded, retry"
            )
            return error_response(unavailable, headers={"Retry-After": "1"})
        if is_lock_conflict(exc):
            # Another writer held the lock past every wait (SQLite's busy timeout,
            # PostgreSQL's lock timeout or deadlock breaking): the failed transaction
            # rolled back, so this is the database's moment, not a fault of the
            # request's. Not "nothing was recorded": a route that wrote in an earlier
            # transaction keeps that; its retry (with its Idempotency-Key) is safe.
            busy = DatabaseUnavailableError(
                "", "the database is busy with other writes; retry the request"
            )
            return error_response(busy, headers={"Retry-After": "1"})
        body = {"code": "INTERNAL", "message": "internal error; see the server log", "errors": []}
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(DeliveryError, on_delivery_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
