"""
Real receivers for channel deliveries: a webhook endpoint under uvicorn that keeps each
request, and an aiosmtpd server that keeps each message (real services, not mocks).
"""

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.handlers.channels.standins import free_port


@dataclass
class Captured:
    """One received webhook request."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    """Answers every POST with ``status``; ``received`` is filled from the server thread."""

    status: int = 200
    received: list[Captured] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        async def hook(request: Request) -> JSONResponse:
            body = await request.body()
            self.received.append(Captured(request.url.path, dict(request.headers), body))
            self.arrived.set()
            return JSONResponse({"ok": True}, status_code=self.status)

        return Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])


@dataclass
class MailBox:
    """aiosmtpd handler that keeps every envelope; ``got`` is set on each message."""

    envelopes: list[Envelope] = field(default_factory=list)
    got: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        self.got.set()
        return "250 2.0.0 Message accepted for delivery"


@contextmanager
def smtp_server() -> Iterator[tuple[int, MailBox]]:
    """A plain aiosmtpd server on a free port, stopped at exit."""
    box = MailBox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, box
    finally:
        controller.stop()


async def wait_for(event: threading.Event, limit_s: float = 10.0) -> None:
    """Wait on a thread event from async code without blocking the loop."""
    ok = await asyncio.to_thread(event.wait, limit_s)
    assert ok, "timed out waiting for the receiver"
