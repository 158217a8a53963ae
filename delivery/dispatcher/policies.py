"""
The dispatcher's view of the delivery policies: each project's policy read at most
once per ``ttl_s`` (a burst dispatches thousands of messages a second from a
handful of projects, which must not cost a query each), and the quiet hours of a
batch's users read once per batch, only for projects where some user has them.

With every policy off a batch costs nothing here after the first read: the
cached project entries say so and no other query runs.
"""

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from delivery.dispatcher.cache import ProjectCache
from delivery.domain import Draft
from delivery.policy import DEFAULT_POLICY, ProjectPolicy, QuietHours, project_policy, quiet_hours
from delivery.store.policy import PolicySource, UserOf


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
        self._cache: ProjectCache[ProjectRules] = ProjectCache(self._load, ttl_s=ttl_s, clock=clock)

    @property
    def reads(self) -> int:
        """Store reads made (tests and the benchmark check the cache)."""
        return self._cache.reads

    async def _load(self, project_ids: list[str]) -> dict[str, ProjectRules]:
        found = await self._source.project_policies(project_ids)
        loaded: dict[str, ProjectRules] = {}
        for project_id in project_ids:
            text, has_quiet = found.get(project_id, (None, False))
            rules = ProjectRules(project_policy(text), has_quiet)
            loaded[project_id] = OFF if rules == OFF else rules
        return loaded

    async def rules(self, project_ids: Iterable[str]) -> dict[str, ProjectRules]:
        """The rules of every project named, reading the stale ones in one query."""
        return await self._cache.get(project_ids)

    async def of_drafts(
        self, drafts: Sequence[Draft]
    ) -> tuple[dict[str, ProjectPolicy], dict[UserOf, QuietHours]]:
        """
        What the drafts' messages are decided by: their projects' policies that
        are on, and their users' quiet hours (the dispatcher's batch, an advance).
        """
        if not drafts:
            return {}, {}
        rules = await self.rules({d.project_id for d in drafts})
        policies = {p: r.policy for p, r in rules.items() if not r.policy.is_default}
        users = [(d.project_id, d.user_id) for d in drafts if rules[d.project_id].quiet_hours]
        quiet = await self.quiet_hours(users) if users else {}
        return policies, quiet

    async def quiet_hours(self, users: Iterable[UserOf]) -> dict[UserOf, QuietHours]:
        """The quiet hours of those ``users`` that have them (one read per batch)."""
        wanted = set(users)
        if not wanted:
            return {}
        rows = await self._source.quiet_hours_of(wanted)
        return {user: hours for user, row in rows.items() if (hours := quiet_hours(row))}
