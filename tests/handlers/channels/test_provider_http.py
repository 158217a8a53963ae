"""
The providers' plain HTTP/1.1 path (``DirectPost`` on a ``ProviderHttpClient``): the
response framing rules, and real exchanges with a scripted server on a local socket.
"""

import asyncio
import contextlib
import gzip
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
import pytest
import uvloop

from handlers.base import Retry
from handlers.classify import classify_exception
from handlers.fanout import provider_http_client
from handlers.provider_http import MAX_BODY, DirectPost, ProviderHttpClient, parse_response
from tests.handlers.channels.conftest import TlsFiles, tls_files  # noqa: F401 - fixture

# --- framing (pure) ---------------------------------------------------------------


def test_content_length_body_waits_for_every_byte() -> None:
    """A Content-Length body is whole only once all its bytes are in; the rest stays."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-A: b\r\n\r\n"

    assert parse_response(head + b'{"a":', eof=False) is None
    parsed, used = parse_response(head + b'{"a":1}HTTP', eof=False) or (None, 0)

    assert parsed is not None
    assert (parsed.status, parsed.body, parsed.keep_alive) == (200, b'{"a":1}', True)
    assert parsed.headers == [(b"Content-Length", b"7"), (b"X-A", b"b")]
    assert used == len(head) + 7


def test_chunked_body_is_joined_and_needs_its_last_chunk_and_trailers() -> None:
    """Chunks (with extensions) are joined; the answer ends after the trailer section."""
    head = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"4;ext=1\r\nWiki\r\n6\r\npedia \r\n0\r\n"

    assert parse_response(head + chunks[:12], eof=False) is None
    assert parse_response(head + chunks, eof=False) is None
    assert parse_response(head + chunks + b"Trailer: x\r\n", eof=False) is None
    whole = head + chunks + b"Trailer: x\r\n\r\n"
    parsed, used = parse_response(whole, eof=False) or (None, 0)

    assert parsed is not None
    assert (parsed.status, parsed.body) == (201, b"Wikipedia ")
    assert used == len(whole)


def test_interim_answers_are_passed_over() -> None:
    """A 100 Continue before the final answer is not the answer."""
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nContent-Length: 0\r\n\r\n"
    parsed, _ = parse_response(data, eof=False) or (None, 0)

    assert parsed is not None
    assert parsed.status == 429


def test_connection_close_and_http_1_0_are_not_kept() -> None:
    """``Connection: close``, and HTTP/1.0 without keep-alive, end the connection."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    old_kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"

    kept = []
    for data in (closing, old, old_kept):
        parsed, _ = parse_response(data, eof=False) or (None, 0)
        assert parsed is not None
        kept.append(parsed.keep_alive)

    assert kept == [False, False, True]


def test_unframed_body_runs_to_the_end_of_the_connection() -> None:
    """Without Content-Length or chunking the body is whatever came before the close."""
    data = b"HTTP/1.1 200 OK\r\n\r\nall of it"

    assert parse_response(data, eof=False) is None
    parsed, _ = parse_response(data, eof=True) or (None, 0)
    assert parsed is not None
    assert (parsed.body, parsed.keep_alive) == (b"all of it", False)


@pytest.mark.parametrize(
    ("data", "eof"),
    [
        (b"SMTP 220 hello\r\n\r\n", False),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", True),
        (b"HTTP/1.1 200 OK\r\nContent", True),
    ],
)
def test_bad_or_cut_answers_are_protocol_errors(data: bytes, eof: bool) -> None:
    """Not HTTP, a bad chunk size, a body cut short by the close: protocol errors."""
    with pytest.raises(httpx.RemoteProtocolError):
        parse_response(data, eof=eof)


def test_chunked_with_content_length_is_read_as_chunked_and_not_kept() -> None:
    """
    Both framings: the chunks are the body (RFC 9112 section 6.3) and the connection is
    not reused, as the answer may be an attempt at smuggling a second one.
    """
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    parsed, used = parse_response(data, eof=False) or (None, 0)

    assert parsed is not None
    assert (parsed.body, parsed.keep_alive, used) == (b"hello", False, len(data))


def test_a_coding_other_than_final_chunked_runs_to_the_close() -> None:
    """``Transfer-Encoding: gzip`` alone: the body ends with the connection."""
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef"

    assert parse_response(data, eof=False) is None
    parsed, _ = parse_response(data, eof=True) or (None, 0)
    assert parsed is not None
    assert (parsed.body, parsed.keep_alive) == (b"abcdef", False)


def test_two_different_content_lengths_are_a_protocol_error() -> None:
    """Which length frames the body would be a guess."""
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"
    with pytest.raises(httpx.RemoteProtocolError):
        parse_response(data, eof=False)


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n"
        % (MAX_BODY, b"a" * MAX_BODY, 1),
        b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * (MAX_BODY + 1),
        # Not body, so not counted as body, yet held: bounded all the same.
        CHUNKED + b"1;" + b"x" * (MAX_BODY + 200_000),
        CHUNKED + b"0\r\n" + b"X-Trailer: y\r\n" * 100_000,
        CHUNKED + b"1\r\na\r\n" * 200_000,
    ],
    ids=[
        "content-length",
        "huge-content-length",
        "one-chunk",
        "chunks",
        "to-close",
        "endless-chunk-size-line",
        "endless-trailers",
        "one-byte-chunks",
    ],
)
def test_a_body_over_the_cap_is_refused_before_it_is_all_in(data: bytes) -> None:
    """Over ``MAX_BODY``, declared or received, without waiting for the rest or the close."""
    with pytest.raises(httpx.RemoteProtocolError, match="over"):
        parse_response(data, eof=False)


def test_a_body_at_the_cap_is_whole() -> None:
    """Exactly ``MAX_BODY`` bytes is still an answer."""
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MAX_BODY + b"a" * MAX_BODY
    parsed, _ = parse_response(data, eof=False) or (None, 0)
    assert parsed is not None
    assert len(parsed.body) == MAX_BODY


# --- exchanges with a scripted server -----------------------------------------------


@dataclass
class Scripted:
    """A local server that answers each request with the next scripted reply."""

    replies: list[Callable[[asyncio.StreamWriter], bytes | None]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                self.received.set()
                reply = self.replies.pop(0)(writer)
                if reply is None:
                    writer.close()
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
            writer.close()


def ok(body: bytes = b'{"sid":"SM1"}', *extra: bytes) -> Callable[[asyncio.StreamWriter], bytes]:
    head = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n" + b"".join(extra)
    return lambda _: head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    script = Scripted([])
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script.url = f"http://127.0.0.1:{port}/2010-04-01/Messages.json?x=1"
    yield script
    server.close()


async def test_posts_are_written_as_documented_and_reuse_one_connection(
    scripted: Scripted,
) -> None:
    """Two POSTs: the exact request bytes, on one kept-alive connection."""
    scripted.replies = [ok(), ok()]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        post = DirectPost(client, scripted.url)
        first = await post(b"To=%2B1&Body=hi", {"Authorization": "Basic eDp5"})
        second = await post(b"To=%2B2", {"Authorization": "Basic eDp5"})

    assert (first.status_code, first.json(), second.status_code) == (201, {"sid": "SM1"}, 201)
    assert scripted.connections == 1
    request = scripted.requests[0].split(b"\r\n")
    assert request[0] == b"POST /2010-04-01/Messages.json?x=1 HTTP/1.1"
    assert request[1] == b"Host: " + scripted.url.split("/")[2].encode()
    fields = dict(line.split(b": ", 1) for line in request[2:] if b": " in line)
    assert fields[b"Authorization"] == b"Basic eDp5"
    assert fields[b"Content-Length"] == b"15"
    # The client's defaults (its Accept-Encoding is what httpx's Response decodes).
    assert {k: v for k, v in fields.items() if k.islower()} == {
        k.encode(): v.encode() for k, v in client.headers.items() if k != "host"
    }
    assert scripted.requests[0].endswith(b"\r\n\r\nTo=%2B1&Body=hi")
    # Closing the client closed its idle connection: the server read the end.
    async with asyncio.timeout(5):
        await scripted.closed.wait()


async def test_chunked_gzip_answer_is_decoded(scripted: Scripted) -> None:
    """A chunked, gzip-encoded answer reads back as its JSON."""
    packed = gzip.compress(json.dumps({"name": "projects/p/messages/1"}).encode())
    half = len(packed) // 2
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        packed[:half],
        len(packed) - half,
        packed[half:],
    )
    scripted.replies = [
        lambda _: (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body
        )
    ]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        response = await DirectPost(client, scripted.url)(b"{}", {})

    assert response.json() == {"name": "projects/p/messages/1"}


async def test_connection_close_answer_is_not_reused(scripted: Scripted) -> None:
    """After ``Connection: close`` the next POST opens a new connection."""
    scripted.replies = [ok(b"{}", b"Connection: close\r\n"), ok()]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        post = DirectPost(client, scripted.url)
        await post(b"a", {})
        await post(b"b", {})

    assert scripted.connections == 2


async def test_hang_up_without_an_answer_is_a_transient_protocol_error(
    scripted: Scripted,
) -> None:
    """The server closes instead of answering: a protocol error, classified as Retry."""
    scripted.replies = [lambda _: None]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await DirectPost(client, scripted.url)(b"a", {})

    assert isinstance(classify_exception(caught.value), Retry)


async def test_no_answer_within_the_read_timeout_is_a_read_timeout(scripted: Scripted) -> None:
    """A server that never answers: ``ReadTimeout`` after the client's read timeout."""
    scripted.replies = [lambda _: b""]
    async with provider_http_client(timeout=timedelta(seconds=0.3)) as client:
        # The outer bound only turns a missing read timeout into a failure, not a hang.
        async with asyncio.timeout(10):
            with pytest.raises(httpx.ReadTimeout):
                await DirectPost(client, scripted.url)(b"a", {})


async def test_refused_connection_is_a_connect_error() -> None:
    """Nobody listening: ``ConnectError``, classified as Retry."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await DirectPost(client, f"http://127.0.0.1:{port}/send")(b"a", {})

    assert isinstance(classify_exception(caught.value), Retry)


async def test_a_header_value_with_a_line_break_is_refused_before_connecting(
    scripted: Scripted,
) -> None:
    """A value that would start a header line of its own never reaches the wire."""
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await DirectPost(client, scripted.url)(b"a", {"Authorization": "Bearer t\r\nX: 1"})
    assert (scripted.connections, scripted.requests) == (0, [])


async def test_a_name_with_several_addresses_connects_to_the_one_listening(
    scripted: Scripted,
) -> None:
    """``localhost`` (often ::1 and 127.0.0.1) reaches the server on 127.0.0.1 alone."""
    scripted.replies.append(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    url = scripted.url.replace("127.0.0.1", "localhost")
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        response = await DirectPost(client, url)(b"a", {})
    assert (response.status_code, response.content) == (200, b"ok")


async def test_a_proxy_for_the_url_goes_through_the_clients_transport(scripted: Scripted) -> None:
    """With a proxy the POST goes to the proxy in absolute form, not straight out."""
    scripted.replies = [ok()]
    proxy = scripted.url.split("/2010")[0]
    async with ProviderHttpClient(proxy=proxy, timeout=5.0) as client:
        response = await DirectPost(client, "http://provider.invalid/send")(b"a", {})

    assert response.status_code == 201
    assert scripted.requests[0].startswith(b"POST http://provider.invalid/send HTTP/1.1\r\n")


async def test_chunked_with_content_length_answer_is_not_reused(scripted: Scripted) -> None:
    """The connection that carried a doubly framed answer is closed, not pooled."""
    both = b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    scripted.replies = [lambda _: b"HTTP/1.1 200 OK\r\n" + both, ok()]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        post = DirectPost(client, scripted.url)
        first = await post(b"a", {})
        await post(b"b", {})

    assert first.json() == {}
    assert scripted.connections == 2


async def test_an_answer_over_the_cap_fails_and_its_connection_is_not_reused(
    scripted: Scripted,
) -> None:
    """A body past ``MAX_BODY``: a protocol error (Retry), and the next POST reconnects."""
    scripted.replies = [ok(b"a" * (MAX_BODY + 1)), ok()]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        post = DirectPost(client, scripted.url)
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await post(b"a", {})
        second = await post(b"b", {})

    assert isinstance(classify_exception(caught.value), Retry)
    assert second.status_code == 201
    assert scripted.connections == 2


async def test_aclose_closes_a_connection_carrying_an_exchange(scripted: Scripted) -> None:
    """
    Closing the client fails the POST waiting on its answer at once (not at its read
    timeout) and closes its socket; the client sends nothing afterwards.
    """
    scripted.replies = [lambda _: b""]  # read the request, never answer
    client = provider_http_client(timeout=timedelta(seconds=60))
    post = DirectPost(client, scripted.url)
    waiting = asyncio.create_task(post(b"a", {}))
    async with asyncio.timeout(5):
        await scripted.received.wait()
        await client.aclose()
        with pytest.raises(httpx.ReadError):
            await waiting
        await scripted.closed.wait()
    with pytest.raises(RuntimeError):
        await post(b"b", {})
    assert scripted.connections == 1


async def test_a_header_the_call_names_replaces_the_clients_default(scripted: Scripted) -> None:
    """
    ``Accept`` given by the call goes out once, with the call's value (as httpx merges
    headers), in whatever case the call spells it.
    """
    scripted.replies = [ok()]
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        assert "accept" in client.headers
        await DirectPost(client, scripted.url)(b"a", {"ACCEPT": "application/json"})

    lines = scripted.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    accept = [line for line in lines if line.lower().startswith(b"accept:")]
    assert accept == [b"ACCEPT: application/json"]
    names = [line.split(b":")[0].lower() for line in lines]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Token": "a", "x-token": "b"},
        {"Content-Length": "1"},
        {"Host": "elsewhere.example"},
        {"Transfer-Encoding": "chunked"},
        {"Bad Name": "a"},
        {"X-Token": "caf\u00e9\u20ac"},
    ],
    ids=["twice", "content-length", "host", "transfer-encoding", "not-a-token", "not-latin-1"],
)
async def test_a_header_given_twice_or_the_clients_own_is_refused(
    scripted: Scripted, headers: dict[str, str]
) -> None:
    """
    A name given twice (in any case), a framing header the client writes itself, a
    name that is not a token, or a value outside Latin-1: refused, nothing sent.
    """
    async with provider_http_client(timeout=timedelta(seconds=5)) as client:
        with pytest.raises(httpx.LocalProtocolError):
            await DirectPost(client, scripted.url)(b"a", headers)
    assert (scripted.connections, scripted.requests) == (0, [])


def test_https_on_uvloop(tls_files: TlsFiles) -> None:  # noqa: F811 - fixture
    """
    The daemon runs on uvloop (the tests above on asyncio's loop): the plain path's
    ``create_connection(sock=..., ssl=...)`` there verifies the provider's certificate
    (a client that does not trust it sends nothing) and keeps the TLS connection alive.
    """
    script = Scripted([ok(), ok()])
    untrusted = Scripted([ok()])

    async def main() -> tuple[list[int], BaseException | None]:
        async with (
            _tls_server(script, tls_files.server_context()) as port,
            _tls_server(untrusted, tls_files.server_context()) as untrusted_port,
        ):
            url = f"https://localhost:{port}/2010-04-01/Messages.json"
            trusting = ProviderHttpClient(verify=tls_files.client_context(), timeout=5)
            async with trusting as client:
                post = DirectPost(client, url)
                codes = [(await post(b"To=%2B1", {})).status_code for _ in range(2)]
            refused: BaseException | None = None
            async with provider_http_client(timeout=timedelta(seconds=5)) as client:
                try:
                    await DirectPost(client, f"https://localhost:{untrusted_port}/x")(b"To=1", {})
                except httpx.ConnectError as exc:
                    refused = exc
        return codes, refused

    codes, refused = asyncio.run(main(), loop_factory=uvloop.new_event_loop)

    assert codes == [201, 201]
    assert script.connections == 1
    assert script.requests[0].startswith(b"POST /2010-04-01/Messages.json HTTP/1.1\r\n")
    assert script.requests[1].endswith(b"\r\n\r\nTo=%2B1")
    assert isinstance(refused, httpx.ConnectError), refused
    assert "certificate" in str(refused).lower()
    assert untrusted.requests == []


@contextlib.asynccontextmanager
async def _tls_server(script: Scripted, context: ssl.SSLContext) -> AsyncIterator[int]:
    """``script`` served over TLS on the running loop, whichever loop that is: its port."""
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
