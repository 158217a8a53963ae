"""SmtpChannel's connection pool against real aiosmtpd servers, including ones that drop."""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from delivery.clock import ManualClock
from handlers.base import Delivered, Retry
from handlers.email import SmtpChannel, SmtpSecurity
from tests.handlers.channels.conftest import make_message
from tests.handlers.channels.standins import SmtpSink, free_port

SENDER = "Sonzai <notify@mail.example.com>"
TO = "ada@example.com"


@dataclass
class PeerSink(SmtpSink):
    """
    A sink that notes which connection (client port) carried each message.

    ``one_per_session``: a second ``MAIL`` on a session gets ``421`` and the
    connection is closed, as a relay that caps its sessions does. A recipient whose
    local part is ``drop`` makes the server close the connection at ``DATA`` with
    no reply.
    """

    peers: list[int] = field(default_factory=list)
    one_per_session: bool = False
    reply_delay_s: float = 0.0
    """Each MAIL, RCPT and DATA reply waits this long (a slow or stalled server)."""
    _used: set[int] = field(default_factory=set)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(self.reply_delay_s)
        port = session.peer[1]
        if self.one_per_session and port in self._used:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 closing this session"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(self.reply_delay_s)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.reply_delay_s)
        if any(to.startswith("drop@") for to in envelope.rcpt_tos):
            assert server.transport is not None
            server.transport.close()
            return "451 never seen"
        self._used.add(session.peer[1])
        self.peers.append(session.peer[1])
        return await super().handle_DATA(server, session, envelope)


@dataclass
class Server:
    port: int
    sink: PeerSink


def _serve(sink: PeerSink, **parameters: Any) -> Iterator[Server]:
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, **parameters)
    controller.start()
    try:
        yield Server(port, sink)
    finally:
        controller.stop()


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Each pool test runs against a server without PIPELINING and one offering it."""
    return bool(request.param)


@pytest.fixture
def server(pipelining: bool) -> Iterator[Server]:
    yield from _serve(PeerSink(pipelining=pipelining))


@pytest.fixture
def capped(pipelining: bool) -> Iterator[Server]:
    """One message per session, then 421 and a closed connection."""
    yield from _serve(PeerSink(pipelining=pipelining, one_per_session=True))


@pytest.fixture
def idle_timeout(pipelining: bool) -> Iterator[Server]:
    """A server that ends a session idle for 0.3 s (aiosmtpd's own timeout)."""
    yield from _serve(PeerSink(pipelining=pipelining), timeout=0.3)


@pytest.fixture
def slow(pipelining: bool) -> Iterator[Server]:
    """Each MAIL, RCPT and DATA answered after 0.4 s."""
    yield from _serve(PeerSink(pipelining=pipelining, reply_delay_s=0.4))


@pytest.fixture
def stalled(pipelining: bool) -> Iterator[Server]:
    """Each MAIL, RCPT and DATA answered after 3 s."""
    yield from _serve(PeerSink(pipelining=pipelining, reply_delay_s=3.0))


def _channel(server: Server, pool_size: int = 3, timeout_s: float = 5) -> SmtpChannel:
    return SmtpChannel(
        "127.0.0.1",
        server.port,
        SENDER,
        clock=_clock(),
        security=SmtpSecurity.PLAIN,
        timeout_s=timeout_s,
        pool_size=pool_size,
    )


def _clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 1, 9, tzinfo=UTC))


async def test_concurrent_sends_share_at_most_pool_size_connections(server: Server) -> None:
    channel = _channel(server, pool_size=3)
    try:
        outcomes = await asyncio.gather(
            *(channel.send(make_message(event_id=f"evt_{i}"), TO) for i in range(30))
        )
    finally:
        await channel.aclose()

    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert server.sink.count == 30
    assert 1 <= len(set(server.sink.peers)) <= 3


async def test_sequential_sends_reuse_one_connection(server: Server) -> None:
    channel = _channel(server)
    try:
        for i in range(5):
            assert isinstance(await channel.send(make_message(event_id=f"evt_{i}"), TO), Delivered)
    finally:
        await channel.aclose()

    assert len(set(server.sink.peers)) == 1


def test_sequential_sends_reuse_one_connection_on_uvloop(server: Server) -> None:
    """
    The long-running commands run on uvloop: over a plain connection there, each
    transaction's reply reader takes the transport's protocol and gives it back
    (``set_protocol`` on uvloop's TCP transport), so the next one reuses the connection.
    """

    async def send() -> list[object]:
        channel = _channel(server)
        try:
            return [await channel.send(make_message(event_id=f"evt_{i}"), TO) for i in range(5)]
        finally:
            await channel.aclose()

    outcomes = asyncio.run(send(), loop_factory=uvloop.new_event_loop)

    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    assert server.sink.count == 5
    assert len(set(server.sink.peers)) == 1


async def test_a_session_the_server_closes_is_resent_on_a_fresh_connection(
    capped: Server,
) -> None:
    """The second message meets 421 on the reused session; it goes, once, on a new one."""
    channel = _channel(capped, pool_size=1)
    try:
        first = await channel.send(make_message(event_id="evt_1"), TO)
        second = await channel.send(make_message(event_id="evt_2"), TO)
    finally:
        await channel.aclose()

    assert isinstance(first, Delivered)
    assert isinstance(second, Delivered)
    assert capped.sink.count == 2
    assert len(set(capped.sink.peers)) == 2


async def test_an_idle_connection_the_server_timed_out_is_not_used(idle_timeout: Server) -> None:
    channel = _channel(idle_timeout, pool_size=1)
    try:
        assert isinstance(await channel.send(make_message(event_id="evt_1"), TO), Delivered)
        await asyncio.sleep(0.8)
        assert isinstance(await channel.send(make_message(event_id="evt_2"), TO), Delivered)
    finally:
        await channel.aclose()

    assert idle_timeout.sink.count == 2
    assert len(set(idle_timeout.sink.peers)) == 2


async def test_a_connection_dropped_mid_message_is_retried_and_never_reused(
    server: Server,
) -> None:
    """A fresh session dropped at DATA: Retry (not resent now), and the next send works."""
    channel = _channel(server, pool_size=1)
    try:
        dropped = await channel.send(make_message(event_id="evt_1"), "drop@example.com")
        after = await channel.send(make_message(event_id="evt_2"), TO)
    finally:
        await channel.aclose()

    assert isinstance(dropped, Retry)
    assert isinstance(after, Delivered)
    assert server.sink.count == 1


async def test_the_timeout_bounds_each_reply_not_the_whole_transaction(slow: Server) -> None:
    """Three replies of 0.4 s each under a 1 s timeout: 1.2 s in all, and the mail is sent."""
    channel = _channel(slow, timeout_s=1.0)
    try:
        outcome = await asyncio.wait_for(channel.send(make_message(), TO), 10)
    finally:
        await channel.aclose()

    assert isinstance(outcome, Delivered)
    assert slow.sink.count == 1


async def test_a_reply_past_the_timeout_is_retried_and_the_connection_not_reused(
    stalled: Server,
) -> None:
    """A server that stops answering: Retry once ``timeout_s`` passes, not at its reply."""
    channel = _channel(stalled, pool_size=1, timeout_s=0.5)
    try:
        started = asyncio.get_running_loop().time()
        outcome = await asyncio.wait_for(channel.send(make_message(), TO), 10)
        took = asyncio.get_running_loop().time() - started
    finally:
        await channel.aclose()

    assert isinstance(outcome, Retry)
    assert "SMTPReadTimeoutError" in outcome.reason
    assert took < 2.5
    assert channel._idle == []  # the timed-out session is closed, never pooled


def test_pool_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        SmtpChannel("127.0.0.1", 25, SENDER, clock=_clock(), pool_size=0)
