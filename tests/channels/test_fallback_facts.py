"""A project channel's send is not the user's delivery: the fallback still goes on."""

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.channels import ChannelStore
from delivery.store.tables.channels import ChannelAttemptRow
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 10, 30, tzinfo=UTC)


def attempt(aid: str, **over: object) -> dict[str, object]:
    values: dict[str, object] = {
        "id": aid,
        "project_id": "proj_1",
        "notification_id": "msg_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "kind": "webhook",
        "contact_id": None,
        "channel_id": None,
        "destination": "https://example.test/…",
        "status": "sent",
        "created_at": NOW,
    }
    values.update(over)
    return values


async def test_only_the_user_s_own_channels_count_as_sent(engine: AsyncEngine) -> None:
    await rows.project(engine)
    store = ChannelStore(engine)
    await rows.insert(engine, ChannelAttemptRow, **attempt("cha_1", channel_id="nch_1"))
    _, sent = await store.fallback_facts("msg_1")
    assert sent is False
    await rows.insert(engine, ChannelAttemptRow, **attempt("cha_2", kind="fcm", contact_id="con_1"))
    _, sent = await store.fallback_facts("msg_1")
    assert sent is True
