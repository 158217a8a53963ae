"""
A per-project value read in batches and reused for a while: the dispatcher's
templates and delivery policies, which change rarely and are asked for per batch.
"""

import time
from collections.abc import Awaitable, Callable, Iterable

MAX_CACHED_PROJECTS = 10_000
"""Past this many cached projects, expired entries are dropped before adding more."""


class ProjectCache[T]:
    """
    Values per project id, loaded for the stale ones in one call and kept ``ttl_s``.

    Args:
        load: the values of the projects named (one store read); it answers every
            project it is given, with that project's default when it has nothing.
        ttl_s: how long a project's value is reused (0: loaded every call).
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self,
        load: Callable[[list[str]], Awaitable[dict[str, T]]],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, T]] = {}
        self.reads = 0
        """Loads made (tests and the benchmarks check the cache)."""

    async def get(self, project_ids: Iterable[str]) -> dict[str, T]:
        """The value of every project named, loading the stale ones in one call."""
        now = self._clock()
        wanted = set(project_ids)
        stale = [p for p in wanted if p not in self._entries or self._entries[p][0] <= now]
        if stale:
            found = await self._load(stale)
            self.reads += 1
            if len(self._entries) + len(stale) > MAX_CACHED_PROJECTS:
                self._entries = {p: e for p, e in self._entries.items() if e[0] > now}
            for project_id in stale:
                self._entries[project_id] = (now + self._ttl_s, found[project_id])
        return {p: self._entries[p][1] for p in wanted}
