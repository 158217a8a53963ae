"""
What the API's one outer middleware costs per request: request id, access log line
(one JSON line, written to /dev/null), Prometheus counter and histogram by route
template, in-flight gauge.

Run: ``.venv/bin/python bench/bench_request_overhead.py`` (``--quick`` for a smoke run).

The floor is the same Starlette route with no middleware, driven by the same direct
ASGI calls (no sockets, so the figure is the middleware's alone). Three cases: a
routed 200, a 401 answered before routing (its route template looked up against the
app's routes), and the same 200 with tracing on (spans to an in-memory exporter).
Each figure is the best of several timed passes, since the machine is shared.
"""

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from delivery import tracing
from delivery.api.metrics import HttpMetrics, RequestContextMiddleware
from delivery.api.routes import ROUTERS
from delivery.logs import configure_logging

PATH = "/api/v1/agents/agent_1/notifications"


async def notifications(_request: Request) -> Response:
    return JSONResponse({"notifications": []})


def refuse_unauthenticated(app: ASGIApp) -> ASGIApp:
    """A stand-in for the auth middleware: 401 before routing without a header."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(k == b"authorization" for k, _ in scope["headers"]):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await app(scope, receive, send)

    return guarded


async def call(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return status


async def per_request_us(app: ASGIApp, headers: list[tuple[bytes, bytes]], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await call(app, headers)
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


async def main(n: int) -> None:
    inner = Starlette(routes=[Route("/api/v1/agents/{agent_id}/notifications", notifications)])
    guarded = refuse_unauthenticated(inner)
    routes = [route for router in ROUTERS for route in router.routes]
    ours = RequestContextMiddleware(guarded, HttpMetrics(), routes)
    authed = [(b"authorization", b"Bearer x")]
    assert await call(ours, authed) == 200
    assert await call(ours, []) == 401

    floor = await per_request_us(guarded, authed, n)
    routed = await per_request_us(ours, authed, n)
    refused_floor = await per_request_us(guarded, [], n)
    refused = await per_request_us(ours, [], n)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    tracing.use_provider(provider)
    traced = await per_request_us(ours, authed, n)
    tracing.use_provider(None)

    print(f"requests per pass: {n}, best of 5 passes, direct ASGI calls")
    print(
        f"200 routed:   floor {floor:7.1f} us  with middleware {routed:7.1f} us  "
        f"overhead {routed - floor:5.1f} us  ratio {routed / floor:.2f}"
    )
    print(
        f"401 refused:  floor {refused_floor:7.1f} us  with middleware {refused:7.1f} us  "
        f"overhead {refused - refused_floor:5.1f} us  ratio {refused / refused_floor:.2f}"
    )
    print(
        f"200 traced:   floor {floor:7.1f} us  with middleware {traced:7.1f} us  "
        f"overhead {traced - floor:5.1f} us  ratio {traced / floor:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    args = parser.parse_args()
    # The access line is rendered and written, as in production, but to nowhere.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    configure_logging("INFO", json=True)
    asyncio.run(main(500 if args.quick else 5000))
