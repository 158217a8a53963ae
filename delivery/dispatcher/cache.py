"""
A per-project value read in batches and reused for a while: the dispatcher's
templates and delivery policies, which change rarely and are asked for per batch.
"""

import asyncio
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
        self._loading: dict[str, asyncio.Task[dict[str, T]]] = {}
        """Project id -> the load of it under way (shared by concurrent callers)."""
        self.reads = 0
        """Loads made (tests and the benchmarks check the cache)."""

    async def get(self, project_ids: Iterable[str]) -> dict[str, T]:
        """
        The value of every project named, loading the stale ones in one call.

        A project another caller is loading right now is not loaded again: the
        concurrent callers (the channels worker's retries of one sweep) wait for that
        one load, so a cold cache costs one read per project, not one per caller.
        """
        now = self._clock()
        wanted = set(project_ids)
        values: dict[str, T] = {}
        stale: list[str] = []
        for project_id in wanted:
            entry = self._entries.get(project_id)
            if entry is not None and entry[0] > now:
                values[project_id] = entry[1]
            else:
                stale.append(project_id)
        if not stale:
            return values
        loads = {self._loading[p] for p in stale if p in self._loading}
        mine = [p for p in stale if p not in self._loading]
        if mine:
            load = asyncio.create_task(self._load_stale(mine, now))
            # Retrieved here too: a load whose callers were all cancelled logs nothing.
            load.add_done_callback(lambda t: t.cancelled() or t.exception())
            for project_id in mine:
                self._loading[project_id] = load
            loads.add(load)
        for load in loads:
            # Shielded: one caller's cancellation must not cancel the others' load.
            found = await asyncio.shield(load)
            values.update((p, found[p]) for p in stale if p in found)
        return values

    async def _load_stale(self, stale: list[str], now: float) -> dict[str, T]:
        try:
            found = await self._load(stale)
            self.reads += 1
            if len(self._entries) + len(stale) > MAX_CACHED_PROJECTS:
                self._entries = {p: e for p, e in self._entries.items() if e[0] > now}
            for project_id in stale:
                self._entries[project_id] = (now + self._ttl_s, found[project_id])
            return {p: found[p] for p in stale}
        finally:
            for project_id in stale:
                if self._loading.get(project_id) is asyncio.current_task():
                    del self._loading[project_id]
