"""
Request context and Prometheus metrics for the API.

:class:`RequestContextMiddleware` gives every request an id (``X-Request-ID``,
echoed back), binds it into structlog's context so every log line of the
request carries it, logs one line per request, and feeds :class:`HttpMetrics`,
which ``/metrics`` renders in the Prometheus text format (version 0.0.4).
"""

import bisect
import re
import time
import uuid
from collections import defaultdict

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_log = structlog.get_logger("delivery.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """Counters and a latency histogram per (method, route template, status)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.bucket_counts: dict[tuple[str, str], list[int]] = defaultdict(
            lambda: [0] * (len(BUCKETS) + 1)
        )
        self.duration_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.in_flight = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests[(method, route, status)] += 1
        self.bucket_counts[(method, route)][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.duration_sum[(method, route)] += seconds

    def render(self, extra: dict[str, float] | None = None) -> str:
        """The Prometheus text exposition of everything observed, plus ``extra`` gauges."""
        lines = [
            "# HELP delivery_http_requests_total HTTP requests answered.",
            "# TYPE delivery_http_requests_total counter",
        ]
        for (method, route, status), n in sorted(self.requests.items()):
            labels = f'method="{method}",route="{_esc(route)}",status="{status}"'
            lines.append(f"delivery_http_requests_total{{{labels}}} {n}")
        lines += [
            "# HELP delivery_http_request_duration_seconds Time to answer a request.",
            "# TYPE delivery_http_request_duration_seconds histogram",
        ]
        for (method, route), counts in sorted(self.bucket_counts.items()):
            labels = f'method="{method}",route="{_esc(route)}"'
            cumulative = 0
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(
                    f'delivery_http_request_duration_seconds_bucket{{{labels},le="{le}"}} '
                    f"{cumulative}"
                )
            lines.append(f"delivery_http_request_duration_seconds_count{{{labels}}} {cumulative}")
            lines.append(
                f"delivery_http_request_duration_seconds_sum{{{labels}}} "
                f"{self.duration_sum[(method, route)]:.6f}"
            )
        lines += [
            "# HELP delivery_http_requests_in_flight Requests being answered now.",
            "# TYPE delivery_http_requests_in_flight gauge",
            f"delivery_http_requests_in_flight {self.in_flight}",
        ]
        for name, value in sorted((extra or {}).items()):
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    Headers with ``Content-Type: application/json``.

    The API only speaks JSON, and ``curl -d`` sends a form content type by
    default; FastAPI would then not parse the body and answer a puzzling
    "input should be an object". Reading every body as JSON is kinder, and a
    body that is not JSON still gets a clear ``INVALID_REQUEST``.
    """
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    kept.append((b"content-type", b"application/json"))
    return kept


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, structlog binding, access log line, metrics."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        if scope["method"] in _BODY_METHODS and scope["path"].startswith("/api/"):
            scope["headers"] = _as_json(scope["headers"])
        if not _REQUEST_ID.match(request_id):
            request_id = f"req_{uuid.uuid4().hex[:20]}"
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight += 1
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                # Logged here, where the request id is still bound; Starlette's
                # outermost error middleware then answers the 500 body.
                _log.exception("unhandled error", error=type(exc).__name__)
                raise
            finally:
                self.metrics.in_flight -= 1
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe(scope["method"], route, status, elapsed)
                level = _log.error if status >= 500 else _log.debug if status < 400 else _log.info
                level(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
