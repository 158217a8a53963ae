"""
Endpoint auto-disable, on SQLite and PostgreSQL: a real receiver answering 500, the
worker driven by a ManualClock; a streak is "no success since its first failure",
the disable is recorded (reason, project notification, timeline) and re-enabling
answers from when to recover.
"""

import json
from datetime import timedelta
from typing import Any

from handlers.retry import SCHEDULE
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig
from tests.webhooks.helpers import EVENT, webhook_settings

A, U = "agent-1", "user-1"
FEED = "/api/v1/projects/{project}/notifications"


async def _endpoint(rig: Rig) -> dict[str, Any]:
    listed = (await rig.api.get("/api/v1/webhooks")).json()["webhooks"]
    assert len(listed) == 1
    row = dict((await rig.webhooks.list_endpoints(rig.projects["alpha"]))[0])
    row["listed_active"] = listed[0]["is_active"]
    return row


async def _notices(rig: Rig) -> list[dict[str, Any]]:
    answer = await rig.api.get(
        FEED.format(project=rig.projects["alpha"]),
        params={"event_type": "webhook.endpoint_disabled"},
    )
    assert answer.status_code == 200, answer.text
    notices: list[dict[str, Any]] = answer.json()["notifications"]
    return notices


async def test_failing_for_five_days_disables_and_enable_offers_recovery(rig: Rig) -> None:
    """
    With the default setting (5 days), an endpoint answering 500 to every attempt
    is still active after 4 days and disabled on the first failure past 5; one
    project notification says why; enable answers ``recover_since``.
    """
    assert rig.settings.webhook_disable_after_s == 5 * 86400
    receiver, url = rig.receiver(Reply(500, b"down"))
    await rig.register(url)
    worker = rig.worker()
    first_failure = rig.clock.now()
    # A new message a day (and the retries falling due), then one at 4 days 23 h.
    for step in [timedelta(0)] + [timedelta(days=1)] * 4 + [timedelta(hours=23)]:
        rig.clock.advance(step)
        (created,) = await rig.notify(len(receiver.requests) + 1)
        await worker.enqueue([created])
        await worker.sweep()
        endpoint = await _endpoint(rig)
        assert endpoint["failing_since"] == first_failure
        assert endpoint["is_active"], f"disabled at {rig.clock.now() - first_failure}"
        assert await _notices(rig) == []
    # The first failure one hour later, at 5 days, disables.
    rig.clock.advance(timedelta(hours=1))
    (created,) = await rig.notify(99)
    await worker.enqueue([created])
    await worker.sweep()
    disabled_at = rig.clock.now()
    endpoint = await _endpoint(rig)
    assert endpoint["is_active"] is False
    assert endpoint["listed_active"] is False
    assert endpoint["disabled_at"] == disabled_at
    assert endpoint["disabled_reason"].startswith(
        f"no successful attempt since {first_failure.isoformat()}"
    )
    (notice,) = await _notices(rig)
    assert notice["status"] == "pending"  # not yet acknowledged
    assert notice["payload"]["reason"] == endpoint["disabled_reason"]
    assert notice["payload"]["recover_since"] == first_failure.isoformat()
    assert notice["payload"]["webhook_url"] == url
    # No agent queue shows it; the user's timeline names the disabled endpoint.
    queue = await rig.api.get(f"/api/v1/agents/{A}/notifications", params={"status": "all"})
    assert all(
        n["check_type"] != "webhook.endpoint_disabled" for n in queue.json()["notifications"]
    )
    timeline = await rig.api.get(f"/api/v1/agents/{A}/users/{U}/timeline")
    kinds = {e["kind"]: e for e in timeline.json()["events"]}
    assert "no successful attempt" in kinds["webhook_endpoint.disabled"]["summary"]
    # Disabled: nothing is sent any more, and new messages are not queued.
    sent = len(receiver.requests)
    rig.clock.advance(timedelta(hours=12))
    await worker.sweep()
    (later,) = await rig.notify(100)
    assert await worker.enqueue([later]) == 0
    assert len(receiver.requests) == sent

    enabled = await rig.api.post(f"/api/v1/webhooks/{EVENT}/enable")
    assert enabled.status_code == 200, enabled.text
    body = enabled.json()
    assert body["success"] is True
    assert body["was_disabled"] is True
    assert body["recover_since"] == body["failing_since"]
    assert body["recover_since"].startswith(first_failure.strftime("%Y-%m-%dT%H:%M:%S"))
    assert body["disabled_at"].startswith(disabled_at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert body["disabled_reason"] == endpoint["disabled_reason"]
    again = (await rig.api.post(f"/api/v1/webhooks/{EVENT}/enable")).json()
    assert again == {"success": True, "was_disabled": False}
    assert (await _endpoint(rig))["failing_since"] is None
    assert await worker.enqueue([later]) == 1
    missing = await rig.api.post("/api/v1/webhooks/on_nothing/enable")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["field"] == "event_type"
    other = await rig.api.post(f"/api/v1/projects/{rig.projects['beta']}/webhooks/{EVENT}/enable")
    assert other.status_code == 404


async def test_a_success_ends_the_streak(rig: Rig) -> None:
    """500, 200, then 500s: the streak restarts at the failure after the 2xx."""
    settings = webhook_settings(webhook_timeout_s=0.5, webhook_disable_after_s=3600)
    receiver, url = rig.receiver(Reply(500), Reply(200), Reply(500))
    await rig.register(url)
    worker = rig.worker(settings=settings)
    (one,) = await rig.notify(1)
    await worker.enqueue([one])
    await worker.sweep()  # 500: a streak starts
    assert (await _endpoint(rig))["failing_since"] == rig.clock.now()
    rig.clock.advance(SCHEDULE[1])
    await worker.sweep()  # 200: it ends
    assert (await _endpoint(rig))["failing_since"] is None
    rig.clock.advance(timedelta(minutes=50))
    (two,) = await rig.notify(2)
    await worker.enqueue([two])
    restart = rig.clock.now()
    await worker.sweep()  # 500, 50 min after the first failure: a new streak
    rig.clock.advance(SCHEDULE[2])
    await worker.sweep()  # 55 min after the first failure, 5 min into this streak
    endpoint = await _endpoint(rig)
    assert endpoint["failing_since"] == restart
    assert endpoint["is_active"]
    rig.clock.advance(SCHEDULE[3])
    await worker.sweep()  # 35 min into the streak
    assert (await _endpoint(rig))["is_active"]
    rig.clock.advance(SCHEDULE[4])
    await worker.sweep()  # 2 h 35 min into it: past the hour
    endpoint = await _endpoint(rig)
    assert endpoint["is_active"] is False
    (notice,) = await _notices(rig)
    assert notice["payload"]["failing_since"] == restart.isoformat()
    assert json.loads(json.dumps(notice["payload"]))["endpoint_id"] == endpoint["id"]
    assert len(receiver.requests) == 6


async def test_410_disables_with_a_project_notification(rig: Rig) -> None:
    """A 410 disables at once, with the same notification; recovery starts at the 410."""
    _receiver, url = rig.receiver(Reply(410))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    assert (await worker.sweep()).dead == 1
    (notice,) = await _notices(rig)
    assert notice["payload"]["failing_since"] is None
    assert notice["payload"]["recover_since"] == rig.clock.now().isoformat()
    # Explain names the disabled endpoint and its reason.
    timeline = f"/api/v1/agents/{A}/users/{U}/timeline"
    events = (await rig.api.get(timeline, params={"limit": "500"})).json()["events"]
    composed = next(e for e in events if e["kind"] == "notification.composed")
    answer = (
        await rig.api.get(f"{timeline}/explain", params={"at": composed["detail"]["fire_at"]})
    ).json()
    assert answer["code"] == "webhook_failing"
    assert "The endpoint was disabled at" in answer["sentence"]
    assert "410" in answer["sentence"]
    body = (await rig.api.post(f"/api/v1/webhooks/{EVENT}/enable")).json()
    assert body["was_disabled"] is True
    assert "failing_since" not in body
    assert body["recover_since"] == body["disabled_at"]


async def test_recovery_starts_at_the_first_failed_message_not_its_failure(rig: Rig) -> None:
    """
    A message made 10 min before its first (failing) attempt: ``recover_since`` is
    when it was made, so a recovery from there selects it; and a disabled endpoint's
    streak stays as it was, whatever attempt still finishes after the disable.
    """
    settings = webhook_settings(webhook_timeout_s=0.5, webhook_disable_after_s=3600)
    receiver, url = rig.receiver(Reply(500, b"down"))
    await rig.register(url)
    worker = rig.worker(settings=settings)
    (created,) = await rig.notify(1)
    made = rig.start + timedelta(seconds=1)  # the test row's created_at
    rig.clock.advance(timedelta(minutes=10))
    await worker.enqueue([created])
    await worker.sweep()
    first_failure = rig.clock.now()
    assert (await _endpoint(rig))["failing_since"] == first_failure
    for step in SCHEDULE[1:]:
        rig.clock.advance(step)
        await worker.sweep()
        if not (await _endpoint(rig))["is_active"]:
            break
    endpoint = await _endpoint(rig)
    assert endpoint["is_active"] is False
    assert endpoint["failing_since"] == first_failure
    assert len(receiver.requests) >= 2

    body = (await rig.api.post(f"/api/v1/webhooks/{EVENT}/enable")).json()

    assert body["failing_since"].startswith(first_failure.strftime("%Y-%m-%dT%H:%M:%S"))
    assert body["recover_since"].startswith(made.strftime("%Y-%m-%dT%H:%M:%S"))
