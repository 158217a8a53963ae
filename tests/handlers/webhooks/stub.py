"""A scripted webhook receiver: a raw ASGI app to run under uvicorn (tests.fixtures.http)."""

import asyncio
import threading
from dataclasses import dataclass, field

from starlette.types import Receive, Scope, Send


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b"ok"
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0


@dataclass(frozen=True)
class Recorded:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedReceiver:
    """
    Answers the n-th request with ``replies[n]`` (the last reply repeats) and records
    every request. Tracks the peak number of requests in flight at once.
    """

    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    requests: list[Recorded] = field(default_factory=list)
    peak_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            index = len(self.requests)
            self.requests.append(Recorded(scope["path"], headers, body))
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        reply = self.replies[min(index, len(self.replies) - 1)]
        try:
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(k.encode(), v.encode()) for k, v in reply.headers],
                }
            )
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            with self._lock:
                self._in_flight -= 1
