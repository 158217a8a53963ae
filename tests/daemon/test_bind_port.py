"""The API's pre-bound port: connections accepted on it are sent without Nagle delays."""

import asyncio
import socket

from delivery.startup import bind_port


async def test_accepted_connections_have_tcp_nodelay() -> None:
    """asyncio turns TCP_NODELAY on only for sockets declared TCP; bind_port declares it."""
    sock = bind_port("127.0.0.1", 0)
    seen: list[int] = []

    async def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        seen.append(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    port = sock.getsockname()[1]
    async with server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
    assert seen == [1]
