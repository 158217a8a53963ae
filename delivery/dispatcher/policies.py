"""
The dispatcher's view of the delivery policies: each project's policy read at most
once per ``ttl_s`` (a burst dispatches thousands of messages a second from a
handful of projects, which must not cost a query each), and the quiet hours of a
batch's users read once per batch, only for projects where some user has them.

With every policy off a batch costs nothing here after the first read: the
cached project entries say so and no other query runs.
"""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from delivery.policy import DEFAULT_POLICY, ProjectPolicy, QuietHours, project_policy, quiet_hours
from delivery.store.policy import PolicySource, UserOf

MAX_CACHED_PROJECTS = 10_000
"""Past this many cached projects, expired entries are dropped before adding more."""


@dataclass(frozen=True, slots=True)
class ProjectRules:
    """A project's policy, and whether any of its users has quiet hours."""

    policy: ProjectPolicy = DEFAULT_POLICY
    quiet_hours: bool = False


OFF = ProjectRules()


class Policies:
    """
    Project policies through ``source``, each kept ``ttl_s`` seconds.

    Args:
        source: the store's policy reads.
        ttl_s: how long a project's policy is reused (0: read every batch).
        clock: monotonic seconds (tests move it).
    """

    def __init__(
        self,
        source: PolicySource,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._clock = clock
        self._rules: dict[str, tuple[float, ProjectRules]] = {}
        self.reads = 0
        """Store reads made (tests and the benchmark check the cache)."""

    async def rules(self, project_ids: Iterable[str]) -> dict[str, ProjectRules]:
        """The rules of every project named, reading the stale ones in one query."""
        now = self._clock()
        wanted = set(project_ids)
        stale = [p for p in wanted if p not in self._rules or self._rules[p][0] <= now]
        if stale:
            found = await self._source.project_policies(stale)
            self.reads += 1
            if len(self._rules) + len(stale) > MAX_CACHED_PROJECTS:
                self._rules = {p: e for p, e in self._rules.items() if e[0] > now}
            for project_id in stale:
                text, has_quiet = found.get(project_id, (None, False))
                rules = ProjectRules(project_policy(text), has_quiet)
                self._rules[project_id] = (now + self._ttl_s, OFF if rules == OFF else rules)
        return {p: self._rules[p][1] for p in wanted}

    async def quiet_hours(self, users: Iterable[UserOf]) -> dict[UserOf, QuietHours]:
        """The quiet hours of those ``users`` that have them (one read per batch)."""
        wanted = set(users)
        if not wanted:
            return {}
        rows = await self._source.quiet_hours_of(wanted)
        return {user: hours for user, row in rows.items() if (hours := quiet_hours(row))}
