"""
Two projects side by side: every read and write by one against the
other's ids is a 404, lists never show the other's rows, and the same agent id in both
projects names two unrelated agents.
"""

from sqlalchemy import select

from delivery.store.tables import INVENTORY, NOTIFICATIONS, SCHEDULES, WAKEUPS
from tests.api.conftest import START, Api
from tests.api.notes import add_notifications, notification

DAILY = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
SCHEDULE = {"cadence": DAILY, "intent": "i", "check_type": "c"}
A, U = "shared-agent", "shared-user"
WAKEUP = {"user_id": U, "check_type": "c", "intent": "i", "delay_hours": 1}
BASE = f"/api/v1/agents/{A}"
USER = f"{BASE}/users/{U}"


async def test_projects_cannot_see_or_touch_each_other(api: Api) -> None:
    """Beta gets 404 for every one of alpha's ids and sees none of alpha's rows."""
    alpha, beta = api.alpha, api.beta
    sid = (await alpha.post(f"{USER}/schedules", json=SCHEDULE)).json()["schedule_id"]
    wid = (await alpha.post(f"{BASE}/wakeups", json=WAKEUP)).json()["wakeup_id"]
    fid = (await alpha.post(f"{USER}/inventory/items", json={"item_type": "m"})).json()["fact_id"]
    await alpha.post(f"{BASE}/events", json={"user_id": U, "event_type": "e"})
    await add_notifications(
        api.store.engine, [notification(api.projects["alpha"], A, U, n, START) for n in (1, 2)]
    )
    async with api.store.read() as conn:
        mids = (await conn.execute(select(NOTIFICATIONS.c.id))).scalars().all()
    alpha_project = f"/api/v1/projects/{api.projects['alpha']}/notifications"

    foreign = [
        ("GET", f"{USER}/schedules/{sid}", None),
        ("PATCH", f"{USER}/schedules/{sid}", {"intent": "stolen"}),
        ("GET", f"{USER}/schedules/{sid}/upcoming", None),
        ("GET", f"{USER}/inventory/{fid}", None),
        ("PUT", f"{USER}/inventory/{fid}", {"properties": {"x": 1}}),
        ("POST", f"{USER}/inventory", {"action": "remove", "item_type": "m"}),
        ("POST", f"{USER}/schedules", {**SCHEDULE, "inventory_item_id": fid}),
        ("POST", f"{BASE}/wakeups", {**WAKEUP, "inventory_item_id": fid}),
        ("POST", f"{BASE}/notifications/{mids[0]}/consume", None),
        ("GET", alpha_project, None),
        ("POST", f"{alpha_project}/acknowledge", {"notification_ids": list(mids)}),
        ("POST", f"{alpha_project}/acknowledge-all", None),
    ]  # fmt: skip
    for method, path, body in foreign:
        response = await beta.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["code"] == "NOT_FOUND"
    # Deletes are idempotent: another tenant's id answers as an unknown one, and
    # deletes nothing.
    for path in (f"{USER}/schedules/{sid}", f"{BASE}/wakeups/{wid}"):
        assert (await beta.delete(path)).status_code == 204, path
    gone = await beta.delete(f"{USER}/inventory/{fid}")
    assert gone.json() == {"status": "deleted", "fact_id": fid}

    # Lists under the same agent / user ids are empty for beta.
    assert (await beta.get(f"{USER}/schedules")).json() == {"schedules": []}
    assert (await beta.get(f"{BASE}/wakeups")).json() == {"wakeups": []}
    assert (await beta.get(f"{BASE}/events")).json() == {"events": []}
    assert (await beta.get(f"{BASE}/notifications")).json() == {"notifications": []}
    assert (await beta.get(f"{BASE}/notifications/history")).json() == {"notifications": []}
    beta_project = f"/api/v1/projects/{api.projects['beta']}/notifications"
    assert (await beta.get(beta_project)).json() == {"notifications": [], "count": 0}
    ack = await beta.post(f"{beta_project}/acknowledge", json={"notification_ids": list(mids)})
    assert ack.json() == {"acknowledged": 0}
    assert (await beta.post(f"{beta_project}/acknowledge-all")).json() == {"acknowledged": 0}

    # Alpha's rows are untouched.
    one = (await alpha.get(f"{USER}/schedules/{sid}")).json()
    assert one["intent"] == "i"
    assert [w["status"] for w in (await alpha.get(f"{BASE}/wakeups")).json()["wakeups"]] == [
        "pending"
    ]
    assert len((await alpha.get(f"{BASE}/notifications")).json()["notifications"]) == 2
    assert (await alpha.get(alpha_project)).json()["count"] == 2
    for table in (SCHEDULES, WAKEUPS, INVENTORY):
        assert await api.store.count(table) == 1
