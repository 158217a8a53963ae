"""
Inbox states on SQLite and PostgreSQL: seen, read (implies seen), unread, archive and
unarchive per message and in bulk, the badge counts, the list's inbox filters, and
the SDK's notification calls unchanged once messages carry inbox states.
"""

import asyncio
from datetime import timedelta

import sonzai

from delivery.clock import ManualClock
from delivery.store.engine import create_engine
from delivery.store.notifications import InboxAction, SqlNotificationStore
from tests.api.conftest import START, Api
from tests.api.notes import add_notifications, notification
from tests.api.server import serve_api

A, U, V = "agent-1", "user-1", "user-2"
QUEUE = f"/api/v1/agents/{A}/notifications"


async def _seed(api: Api) -> list[str]:
    project = api.projects["alpha"]
    rows = [notification(project, A, U, n, START) for n in range(1, 5)]
    rows.append(notification(project, A, V, 5, START))
    await add_notifications(api.store.engine, rows)
    return [r["id"] for r in rows]


async def _counts(api: Api, user_id: str | None = U) -> dict[str, int]:
    params = {"user_id": user_id} if user_id else {}
    answer = await api.alpha.get(f"{QUEUE}/counts", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, int] = answer.json()
    return body


async def test_per_message_states_and_badge(api: Api) -> None:
    """Each action sets (or clears) its instant once; the badge follows; read implies seen."""
    ids = await _seed(api)
    assert await _counts(api) == {"total": 4, "unseen": 4, "unread": 4, "archived": 0, "pending": 4}
    api.clock.advance(timedelta(minutes=1))
    seen = await api.alpha.post(f"{QUEUE}/{ids[0]}/seen")
    assert seen.status_code == 200, seen.text
    first_seen = seen.json()["seen_at"]
    assert "read_at" not in seen.json()
    assert "archived_at" not in seen.json()
    api.clock.advance(timedelta(minutes=1))
    again = (await api.alpha.post(f"{QUEUE}/{ids[0]}/seen")).json()
    assert again["seen_at"] == first_seen  # repeating keeps the first instant
    read = (await api.alpha.post(f"{QUEUE}/{ids[1]}/read")).json()
    assert read["seen_at"] == read["read_at"]  # read implies seen
    assert await _counts(api) == {"total": 4, "unseen": 2, "unread": 3, "archived": 0, "pending": 4}
    unread = (await api.alpha.post(f"{QUEUE}/{ids[1]}/unread")).json()
    assert "read_at" not in unread
    assert unread["seen_at"] == read["seen_at"]
    archived = (await api.alpha.post(f"{QUEUE}/{ids[2]}/archive")).json()
    assert archived["archived_at"]
    assert archived["status"] == "pending"  # the queue state is untouched
    assert await _counts(api) == {"total": 4, "unseen": 1, "unread": 3, "archived": 1, "pending": 3}
    back = (await api.alpha.post(f"{QUEUE}/{ids[2]}/unarchive")).json()
    assert "archived_at" not in back
    assert (await _counts(api))["archived"] == 0
    # The other user's badge is their own; the agent's spans both.
    assert (await _counts(api, V))["unseen"] == 1
    assert (await _counts(api, None))["total"] == 5
    # Unknown and foreign ids are 404, naming message_id.
    for client in (api.alpha, api.beta):
        missing = await client.post(f"{QUEUE}/{'msg_nope' if client is api.alpha else ids[0]}/read")
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["field"] == "message_id"


async def test_bulk_actions_and_list_filters(api: Api) -> None:
    """Bulk by ids or by user counts only what changed; the list filters by state."""
    ids = await _seed(api)
    bulk = f"{QUEUE}/inbox"
    done = await api.alpha.post(bulk, json={"action": "seen", "message_ids": ids[:2]})
    assert done.json() == {"updated": 2}
    done = await api.alpha.post(bulk, json={"action": "seen", "user_id": U})
    assert done.json() == {"updated": 2}  # the two others of user-1 only
    assert (await api.alpha.post(bulk, json={"action": "seen", "user_id": U})).json() == {
        "updated": 0
    }
    await api.alpha.post(bulk, json={"action": "read", "message_ids": [ids[0]]})
    await api.alpha.post(bulk, json={"action": "archive", "message_ids": [ids[3], "msg_nope"]})

    async def listed(**params: str) -> list[str]:
        answer = await api.alpha.get(QUEUE, params={"user_id": U, **params})
        assert answer.status_code == 200, answer.text
        return [n["message_id"] for n in answer.json()["notifications"]]

    assert await listed() == ids[:4]  # the default list is unchanged
    assert await listed(archived="false") == ids[:3]
    assert await listed(archived="true") == [ids[3]]
    assert await listed(read="true") == [ids[0]]
    assert await listed(read="false", archived="false") == ids[1:3]
    assert await listed(seen="false") == []
    # Inbox instants only when asked for (the SDK's models forbid unknown keys).
    plain = (await api.alpha.get(QUEUE, params={"user_id": U})).json()["notifications"][0]
    assert "seen_at" not in plain
    rich = (await api.alpha.get(QUEUE, params={"user_id": U, "include": "inbox"})).json()
    assert rich["notifications"][0]["read_at"]
    # status=all lists consumed messages beside pending ones.
    assert (await api.alpha.post(f"{QUEUE}/{ids[0]}/consume")).status_code == 200
    assert await listed(status="all") == ids[:4]
    assert await listed() == ids[1:4]
    # Bad input: 400 naming the field, nothing written.
    for body, field in (
        ({"action": "shred", "message_ids": [ids[1]]}, "action"),
        ({"action": "read"}, "message_ids"),
        ({"action": "read", "message_ids": [ids[1]], "user_id": U}, "message_ids"),
        ({"action": "read", "message_ids": []}, "message_ids"),
    ):
        refused = await api.alpha.post(bulk, json=body)
        assert refused.status_code == 400, body
        assert refused.json()["errors"][0]["field"].startswith(field), refused.json()
    for params, field in (({"seen": "yes"}, "seen"), ({"include": "all"}, "include")):
        refused = await api.alpha.get(QUEUE, params=params)
        assert refused.status_code == 400
        assert refused.json()["errors"][0]["field"] == field
    assert (await _counts(api))["unread"] == 2
    # Another project's bulk call changes nothing here.
    other = await api.beta.post(bulk, json={"action": "archive", "user_id": U})
    assert other.json() == {"updated": 0}


async def _mark(database_url: str, project_id: str) -> list[str]:
    engine = create_engine(database_url)
    try:
        rows = [notification(project_id, A, U, n, START) for n in range(1, 4)]
        await add_notifications(engine, rows)
        store = SqlNotificationStore(engine)
        ids = [r["id"] for r in rows]
        for action in (InboxAction.READ, InboxAction.ARCHIVE):
            await store.set_inbox_state(project_id, A, action, now=START, message_ids=ids[:2])
        return ids
    finally:
        await engine.dispose()


def test_sdk_notification_calls_unchanged(database_url: str) -> None:
    """List, strict list, consume and history through the SDK once messages carry states."""
    with serve_api(database_url, ManualClock(START)) as served:
        ids = asyncio.run(_mark(database_url, served.projects["alpha"]))
        with sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client:
            notes = client.agents.notifications
            assert [n.message_id for n in notes.list(A, user_id=U).notifications] == ids
            assert len(notes.list_notifications(A, limit=10).notifications or []) == 3
            assert notes.consume(A, ids[0]).success is True
            assert len(notes.history(A).notifications) == 3
            assert notes.get_notification_history(A, limit=2) is not None
