"""
A provider POST straight through an httpx client's transport.

``httpx.AsyncClient.post`` builds and merges a request (cookies, headers, URL), then runs
auth, redirect and event-hook machinery around the transport; for the FCM and SMS
sends that was about half of each send's CPU under py-spy in
``bench/bench_channels_worker.py`` (the aiohttp transport itself the other half).
:class:`DirectPost` keeps what matters of the client (the transport it would pick for
the URL, proxies included, its default headers and its timeout) and skips the rest: a
provider needs no redirects, and no cookie should ride from one send to the next.
"""

from collections.abc import Mapping
from typing import Any

import httpx


class DirectPost:
    """
    POSTs to one fixed ``url`` with ``client``'s transport, headers and timeout.

    The client still owns the connections (closing it closes them). Errors are the
    transport's httpx exceptions, as ``client.post`` would raise them.

    Args:
        client: the caller-owned client.
        url: where every POST goes.
    """

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = httpx.URL(url)
        self._parts: tuple[httpx.AsyncBaseTransport, dict[str, str], dict[str, Any]] | None = None

    async def __call__(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """One POST of ``content`` with ``headers`` over the client's defaults; read whole."""
        if self._parts is None:
            # Read on first use, as the client's configuration is by then final.
            # ``_transport_for_url`` is httpx's own (private) choice of transport, mounts
            # and proxies included; httpx is bounded below 1.0 and every FCM and SMS
            # test goes through this line, so a change there fails loudly.
            self._parts = (
                self._client._transport_for_url(self._url),
                dict(self._client.headers),
                self._client.timeout.as_dict(),
            )
        transport, defaults, timeout = self._parts
        request = httpx.Request(
            "POST",
            self._url,
            content=content,
            headers={**defaults, **headers},
            extensions={"timeout": timeout},
        )
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response
