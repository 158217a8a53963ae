"""
:class:`SqlStore`: the API's stores over one engine, one per aggregate.

Each aggregate lives in its own module behind a ``Protocol`` that states its
contract: :mod:`.keys`, :mod:`.schedules`, :mod:`.wakeups`, :mod:`.events`,
:mod:`.inventory`, :mod:`.notifications`, :mod:`.idempotency` and :mod:`.templates`. Every method
that touches tenant data takes the caller's ``project_id`` and filters on it
(:func:`delivery.store.common.owned`), so a foreign id behaves exactly like an
unknown one. Statements are SQLAlchemy Core: one round trip per call, no ORM
identity map.
"""

from sqlalchemy import Table, func, select, text

from delivery.bus.subjects import DEFAULT_SUBJECT_PREFIX, Subjects
from delivery.store.advance import AdvanceStore, SqlAdvanceStore
from delivery.store.common import StoreBase
from delivery.store.engine import Engine
from delivery.store.events import Events, EventStore
from delivery.store.idempotency import Idempotency, IdempotencyStore
from delivery.store.inventory import Inventory, InventoryStore
from delivery.store.keys import Keys, KeyStore
from delivery.store.notifications import NotificationQueue, SqlNotificationStore
from delivery.store.policy import PolicyRecords, PolicyStore
from delivery.store.schedules import ScheduleRecords, ScheduleStore
from delivery.store.templates import MessageTemplates, TemplateStore
from delivery.store.wakeups import Wakeups, WakeupStore


class SqlStore(StoreBase):
    """
    The API's stores over one engine; the store never closes the engine, its owner does.

    Args:
        engine: from :func:`delivery.store.engine.create_engine`; the schema
            must exist (:func:`delivery.store.migrate.migrate`).
        subjects: the deployment's subjects (``Settings.subject_prefix``), for
            the restage messages a schedule or item change queues.

    Attributes:
        keys: projects and API keys.
        schedules: schedules and their fires.
        wakeups: one-off wakeups.
        events: trigger events.
        inventory: inventory items.
        notifications: the notification queue as clients see it.
        idempotency: the recorded answers to ``Idempotency-Key`` requests.
        templates: the project's message templates and their versions.
        clocks: the (agent, user) pairs' advance-time clocks.
        policy: the project's delivery policy and its users' quiet hours.
    """

    def __init__(self, engine: Engine, *, subjects: Subjects | None = None) -> None:
        super().__init__(engine)
        self.subjects = subjects or Subjects(DEFAULT_SUBJECT_PREFIX)
        self.keys: Keys = KeyStore(engine)
        self.schedules: ScheduleRecords = ScheduleStore(engine, self.subjects)
        self.wakeups: Wakeups = WakeupStore(engine)
        self.events: Events = EventStore(engine)
        self.inventory: Inventory = InventoryStore(engine, subjects=self.subjects)
        self.notifications: NotificationQueue = SqlNotificationStore(engine)
        self.idempotency: Idempotency = IdempotencyStore(engine)
        self.templates: MessageTemplates = TemplateStore(engine)
        self.clocks: AdvanceStore = SqlAdvanceStore(engine)
        self.policy: PolicyRecords = PolicyStore(engine)

    async def ping(self) -> None:
        """Run a trivial query; raises whatever the driver raises when the database is down."""
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    async def count(self, table: Table) -> int:
        """Rows in ``table`` across all projects (tests assert that rejections write nothing)."""
        async with self.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())
