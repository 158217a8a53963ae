"""A minimal Server-Sent Events reader for tests (WHATWG HTML "Server-sent events")."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class SseEvent:
    """One dispatched event, or a comment line (``comment`` set, the rest empty)."""

    id: str = ""
    event: str = ""
    data: str = ""
    retry: str = ""
    comments: list[str] = field(default_factory=list)


async def read_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Yield each block ended by a blank line: fields and comments, in stream order."""
    current = SseEvent()
    async for line in response.aiter_lines():
        if line == "":
            yield current
            current = SseEvent()
            continue
        if line.startswith(":"):
            current.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            current.data = f"{current.data}\n{value}" if current.data else value
        elif name in ("id", "event", "retry"):
            setattr(current, name, value)
