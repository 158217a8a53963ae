"""
The operator console's own reads (:mod:`delivery.api.console`): finding users and the
webhook endpoints' health. Everything else the console shows comes from the stores the
API uses (timeline, schedules, notifications, webhooks), so the two never disagree.

Every method takes the signed-in key's ``project_id`` and filters on it.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.engine import RowMapping

from delivery.store.common import StoreBase, owned
from delivery.store.engine import Engine
from delivery.store.tables import DELIVERIES, ENDPOINTS, SCHEDULES
from delivery.store.tables import WEBHOOK_ATTEMPTS as ATTEMPTS

RECENT_ATTEMPTS = 100
"""An endpoint's success rate is over its last this many attempts."""


@dataclass(frozen=True, slots=True)
class UserHit:
    """One (agent, user) pair that has schedules, and how many."""

    agent_id: str
    user_id: str
    schedules: int


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """
    One endpoint as the console lists it.

    ``succeeded`` of ``recent`` is over the last :data:`RECENT_ATTEMPTS` attempts;
    ``last_status`` / ``last_code`` / ``last_at`` are the newest attempt's (``None``
    before any); ``pending`` counts deliveries waiting in the queue.
    """

    endpoint: RowMapping
    recent: int
    succeeded: int
    last_status: str | None
    last_code: int | None
    last_at: datetime | None
    pending: int

    @property
    def failing(self) -> bool:
        """Disabled, or its newest attempt failed."""
        return not self.endpoint["is_active"] or self.last_status == "failed"


class ConsoleStore(StoreBase):
    """The console's reads over one engine; the engine's owner disposes of it."""

    def __init__(self, engine: Engine) -> None:
        # The endpoints read runs several statements that must agree.
        super().__init__(engine, autocommit_reads=False)

    async def find_users(
        self, project_id: str, *, agent_prefix: str, user_prefix: str, limit: int
    ) -> list[UserHit]:
        """
        (agent, user) pairs of the project with schedules whose ids start with the
        prefixes (either may be empty), in id order, at most ``limit``.
        """
        s = SCHEDULES.c
        conds = list(owned(SCHEDULES, project_id))
        if agent_prefix:
            conds.append(s.agent_id.startswith(agent_prefix, autoescape=True))
        if user_prefix:
            conds.append(s.user_id.startswith(user_prefix, autoescape=True))
        stmt = (
            select(s.agent_id, s.user_id, func.count().label("n"))
            .where(*conds)
            .group_by(s.agent_id, s.user_id)
            .order_by(s.agent_id, s.user_id)
            .limit(limit)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [UserHit(r.agent_id, r.user_id, int(r.n)) for r in rows]

    async def endpoints(self, project_id: str) -> list[EndpointHealth]:
        """The project's endpoints by event type, each with its recent delivery health."""
        e, a, d = ENDPOINTS.c, ATTEMPTS.c, DELIVERIES.c
        out: list[EndpointHealth] = []
        async with self.read() as conn:
            endpoints = (
                (
                    await conn.execute(
                        select(ENDPOINTS)
                        .where(*owned(ENDPOINTS, project_id))
                        .order_by(e.event_type)
                    )
                )
                .mappings()
                .all()
            )
            for endpoint in endpoints:
                recent = (
                    await conn.execute(
                        select(a.status, a.response_code, a.created_at)
                        .where(*owned(ATTEMPTS, project_id), a.event_type == endpoint["event_type"])
                        .order_by(a.seq.desc())
                        .limit(RECENT_ATTEMPTS)
                    )
                ).all()
                pending = (
                    await conn.execute(
                        select(func.count()).where(
                            d.endpoint_id == endpoint["id"], d.status == "pending"
                        )
                    )
                ).scalar_one()
                newest = recent[0] if recent else None
                out.append(
                    EndpointHealth(
                        endpoint=endpoint,
                        recent=len(recent),
                        succeeded=sum(1 for r in recent if r.status == "success"),
                        last_status=None if newest is None else newest.status,
                        last_code=None if newest is None else newest.response_code,
                        last_at=None if newest is None else newest.created_at,
                        pending=int(pending),
                    )
                )
        return out
