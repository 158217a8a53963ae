"""
The webhook channel's direct HTTP/1.1 path against raw socket receivers: framing,
truncation, keep-alive, TLS verification and SNI, and the SSRF guard at connect time.

A raw asyncio server rather than uvicorn where the test needs bytes uvicorn would not
send (a chunked or close-delimited answer larger than any cap, a connection closed after
an answer) or needs to see the connection itself (how many, which SNI name).
"""

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import uvloop

from handlers.base import Delivered, Failed, Retry
from handlers.provider_http import parse_response
from handlers.ssrf import StaticResolver, parse_allow_nets
from handlers.webhooks import transport
from handlers.webhooks.sender import AttemptStatus
from tests.fixtures.http import ServeApp
from tests.handlers.channels.conftest import TlsFiles, tls_files  # noqa: F401 - fixture
from tests.handlers.webhooks.stub import ScriptedReceiver
from tests.handlers.webhooks.test_sender import channel, endpoint, make_message

LOCAL = parse_allow_nets("127.0.0.0/8")


@dataclass
class RawReceiver:
    """
    A real TCP (or TLS) HTTP/1.1 receiver answering each request with ``answer(n)``'s
    bytes; records request heads, bodies, connections and the SNI names it was given.
    """

    answer: Callable[[int], bytes]
    close_after: bool = False
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    ended: int = 0
    """Connections over: closed by the client, or after ``close_after``."""
    sni: list[str | None] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                writer.write(self.answer(len(self.heads) - 1))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended += 1
            writer.close()


type StartRaw = Callable[..., Awaitable[tuple[RawReceiver, int]]]


@pytest.fixture
async def raw_server() -> AsyncIterator[StartRaw]:
    servers: list[asyncio.Server] = []

    async def start(
        answer: Callable[[int], bytes],
        *,
        close_after: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[RawReceiver, int]:
        receiver = RawReceiver(answer, close_after)
        server = await _start(receiver, tls)
        servers.append(server)
        return receiver, server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _start(receiver: RawReceiver, tls: ssl.SSLContext | None) -> asyncio.Server:
    """``receiver`` served on the running loop, over TLS when given a context (SNI noted)."""
    if tls is not None:

        def remember(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            receiver.sni.append(name)

        tls.sni_callback = remember
    return await asyncio.start_server(receiver.handle, "127.0.0.1", 0, ssl=tls)


def ok(_: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_connections_are_kept_alive_and_reused(raw_server: StartRaw) -> None:
    """Sequential deliveries to one origin share one connection; each request is whole."""
    receiver, port = await raw_server(ok)
    async with channel() as ch:
        for i in range(3):
            result = await ch.deliver(
                make_message(f"evt_{i}"), endpoint(f"http://127.0.0.1:{port}/h?a=1")
            )
            assert result.outcome == Delivered(status_code=200)
            assert result.attempt.response_body == "ok"
    assert receiver.connections == 1
    assert len(receiver.bodies) == 3
    head = receiver.heads[0].decode()
    assert head.startswith("POST /h?a=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in head
    assert head.count("Content-Type: application/json") == 1


async def test_idle_connections_are_closed_once_stale_without_another_delivery(
    raw_server: StartRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Receivers that keep idle connections open forever, one delivery each and none
    after: every idle connection is closed once past the keep-alive, not held until
    its origin is posted to again (many origins would otherwise pin sockets for good).
    """
    monkeypatch.setattr(transport, "KEEPALIVE_S", 0.2)
    started = [await raw_server(ok) for _ in range(5)]
    async with channel() as ch:
        for n, (_, port) in enumerate(started):
            result = await ch.deliver(
                make_message(f"evt_{n}"), endpoint(f"http://127.0.0.1:{port}/h")
            )
            assert result.outcome == Delivered(status_code=200)
        assert [r.connections for r, _ in started] == [1] * 5
        for _ in range(50):
            if all(r.ended == 1 for r, _ in started):
                break
            await asyncio.sleep(0.05)
        assert [r.ended for r, _ in started] == [1] * 5


async def test_a_closed_connection_is_not_reused(raw_server: StartRaw) -> None:
    """A receiver that closes after each answer gets a fresh connection per delivery."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    receiver, port = await raw_server(lambda _: answer, close_after=True)
    async with channel() as ch:
        for i in range(3):
            result = await ch.deliver(
                make_message(f"evt_{i}"), endpoint(f"http://127.0.0.1:{port}/")
            )
            assert isinstance(result.outcome, Delivered), result.outcome
    assert receiver.connections == 3


BIG = 3 * 1024 * 1024
"""Larger than the provider path's whole-body cap: a webhook answer is cut, not refused."""


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(
            lambda: b"HTTP/1.1 503 No\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG,
            id="content-length",
        ),
        pytest.param(
            lambda: (
                b"HTTP/1.1 503 No\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(BIG // 1024))
                + b"0\r\n\r\n"
            ),
            id="chunked",
        ),
        pytest.param(
            lambda: b"HTTP/1.1 503 No\r\nConnection: close\r\n\r\n" + b"x" * BIG, id="to-close"
        ),
    ],
)
async def test_a_huge_answer_is_cut_on_the_record(
    raw_server: StartRaw, framing: Callable[[], bytes]
) -> None:
    """
    An answer body beyond the cap is recorded cut and marked, whatever its framing;
    the attempt is the status's outcome (not a protocol error), and the connection is
    not reused with the rest of that body on it.
    """
    answer = framing()
    receiver, port = await raw_server(lambda _: answer)
    async with channel(body_limit=64) as ch:
        first = await ch.deliver(make_message("evt_a"), endpoint(f"http://127.0.0.1:{port}/"))
        second = await ch.deliver(make_message("evt_b"), endpoint(f"http://127.0.0.1:{port}/"))
    for result in (first, second):
        assert result.outcome == Retry("HTTP 503", status_code=503), result.outcome
        assert result.attempt.response_code == 503
        assert result.attempt.response_body == "x" * 64 + "…[truncated]"
    assert receiver.connections == 2


async def test_a_malformed_answer_is_a_retried_attempt(raw_server: StartRaw) -> None:
    """Bytes that are not an HTTP/1.x answer: Retry with no response code."""
    _, port = await raw_server(lambda _: b"SMTP ready\r\n\r\n")
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://127.0.0.1:{port}/"))
    assert isinstance(result.outcome, Retry)
    assert "HTTP/1.x" in result.outcome.reason
    assert result.attempt.response_code == 0
    assert result.attempt.status is AttemptStatus.FAILED


async def test_interim_answers_are_passed_over(raw_server: StartRaw) -> None:
    """A 100 Continue before the final answer does not end the attempt."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    _, port = await raw_server(lambda _: answer)
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://127.0.0.1:{port}/"))
    assert result.outcome == Delivered(status_code=204)
    assert result.attempt.response_body == ""


async def test_https_verifies_the_certificate_and_sends_sni(
    raw_server: StartRaw,
    tls_files: TlsFiles,  # noqa: F811 - fixture
) -> None:
    """
    https: the certificate is verified against the URL's host name (sent as SNI), and
    the socket goes to the address the guard vetted for that name.
    """
    receiver, port = await raw_server(ok, tls=tls_files.server_context())
    resolver = StaticResolver({"localhost": ["127.0.0.1"]})
    async with channel(resolver=resolver, tls=tls_files.client_context()) as ch:
        result = await ch.deliver(make_message(), endpoint(f"https://localhost:{port}/"))
    assert result.outcome == Delivered(status_code=200), result.outcome
    assert receiver.sni == ["localhost"]
    assert f"\r\nHost: localhost:{port}\r\n" in receiver.heads[0].decode()


async def test_https_refuses_a_certificate_for_another_name(
    raw_server: StartRaw,
    tls_files: TlsFiles,  # noqa: F811 - fixture
) -> None:
    """A certificate that does not name the URL's host: nothing is sent, Retry."""
    receiver, port = await raw_server(ok, tls=tls_files.server_context())
    resolver = StaticResolver({"hooks.tenant.test": ["127.0.0.1"]})
    async with channel(resolver=resolver, tls=tls_files.client_context()) as ch:
        result = await ch.deliver(make_message(), endpoint(f"https://hooks.tenant.test:{port}/"))
    assert isinstance(result.outcome, Retry), result.outcome
    assert "certificate" in result.outcome.reason.lower() or "hostname" in result.outcome.reason
    assert receiver.bodies == []
    assert receiver.sni == ["hooks.tenant.test"]


async def test_https_refuses_an_unknown_issuer(
    raw_server: StartRaw,
    tls_files: TlsFiles,  # noqa: F811 - fixture
) -> None:
    """With the default context a self-signed receiver is not trusted."""
    receiver, port = await raw_server(ok, tls=tls_files.server_context())
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(f"https://127.0.0.1:{port}/"))
    assert isinstance(result.outcome, Retry), result.outcome
    assert receiver.bodies == []


async def test_guard_holds_for_a_name_on_a_kept_alive_origin(http_server: ServeApp) -> None:
    """
    The guard is asked at every new connection: after the name is re-pointed inside,
    a fresh channel's connect is refused and nothing reaches the receiver.
    """
    stub = ScriptedReceiver()
    port = httpx.URL(http_server(stub)).port
    table = {"hooks.tenant.test": ["127.0.0.1"]}
    async with channel(allow_nets=LOCAL, resolver=StaticResolver(table)) as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://hooks.tenant.test:{port}/"))
    assert isinstance(result.outcome, Delivered)
    async with channel(allow_nets=(), resolver=StaticResolver(table)) as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://hooks.tenant.test:{port}/"))
    assert isinstance(result.outcome, Failed)
    assert "loopback" in result.outcome.reason
    assert len(stub.requests) == 1


async def test_close_fails_an_exchange_in_flight(raw_server: StartRaw) -> None:
    """Closing the channel closes a connection carrying a request; the attempt fails."""

    receiver, port = await raw_server(lambda _: b"")
    ch = channel()
    task = asyncio.create_task(ch.deliver(make_message(), endpoint(f"http://127.0.0.1:{port}/")))
    while not receiver.bodies:  # noqa: ASYNC110 - the receiver is not ours to signal from
        await asyncio.sleep(0.01)
    await ch.aclose()
    result = await asyncio.wait_for(task, 2)
    assert isinstance(result.outcome, Retry)
    assert result.attempt.response_code == 0


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123", b"0123"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde", b"abcd"),
        (b"HTTP/1.1 200 OK\r\n\r\n01234", b"0123"),
    ],
)
def test_parse_response_cuts_at_the_cap(raw: bytes, body: bytes) -> None:
    """With body_cap=3 an answer is complete at its fourth body byte, never kept alive."""
    parsed = parse_response(raw, eof=False, body_cap=3)
    assert parsed is not None
    response, used = parsed
    assert (response.status, response.body, response.keep_alive) == (200, body, False)
    assert used == len(raw)


def test_parse_response_within_the_cap_is_whole() -> None:
    """An answer within the cap is read whole and may be kept alive."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    parsed = parse_response(raw, eof=False, body_cap=3)
    assert parsed is not None
    assert (parsed[0].body, parsed[0].keep_alive, parsed[1]) == (b"abc", True, len(raw))
    assert parse_response(raw[:-1], eof=False, body_cap=3) is None


def test_https_on_uvloop(tls_files: TlsFiles) -> None:  # noqa: F811 - fixture
    """
    The daemon runs on uvloop (the tests above on asyncio's loop): its
    ``create_connection(sock=..., ssl=...)`` verifies the certificate against the URL's
    host, sends it as SNI, reuses the kept-alive TLS connection, and refuses a
    certificate for another name before any byte of the request is sent.
    """
    good = RawReceiver(ok)
    refusing = RawReceiver(ok)

    async def main() -> tuple[list[object], object]:
        async with (
            _raw_tls(good, tls_files.server_context()) as good_port,
            _raw_tls(refusing, tls_files.server_context()) as refusing_port,
        ):
            table = {"localhost": ["127.0.0.1"], "hooks.tenant.test": ["127.0.0.1"]}
            resolver = StaticResolver(table)
            async with channel(resolver=resolver, tls=tls_files.client_context()) as ch:
                outcomes: list[object] = []
                for i in range(2):
                    url = endpoint(f"https://localhost:{good_port}/")
                    outcomes.append((await ch.deliver(make_message(f"evt_{i}"), url)).outcome)
                url = endpoint(f"https://hooks.tenant.test:{refusing_port}/")
                refused = (await ch.deliver(make_message("evt_x"), url)).outcome
        return outcomes, refused

    outcomes, refused = asyncio.run(main(), loop_factory=uvloop.new_event_loop)

    assert outcomes == [Delivered(status_code=200)] * 2
    assert good.sni == ["localhost"]
    assert good.connections == 1
    assert len(good.bodies) == 2
    assert isinstance(refused, Retry), refused
    assert refusing.bodies == []
    assert refusing.sni == ["hooks.tenant.test"]


@contextlib.asynccontextmanager
async def _raw_tls(receiver: RawReceiver, context: ssl.SSLContext) -> AsyncIterator[int]:
    """``receiver`` served over TLS on the running loop, whichever loop that is: its port."""

    server = await _start(receiver, context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
