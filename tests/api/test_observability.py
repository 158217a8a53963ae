"""
The API's metrics carry route templates for every answer (also those given before
routing: 401, idempotent replays, 409), its access line is one INFO line per request,
and ``/ready`` names what is not ready.
"""

import re

import structlog

from tests.api.conftest import Api

EVENTS = "/api/v1/agents/{agent_id}/events"
NOTIFICATIONS = "/api/v1/agents/{agent_id}/notifications"


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` with exactly ``labels`` (0 if absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


async def _metrics(api: Api) -> str:
    response = await api.anonymous.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_401_replay_and_409_are_labelled_with_their_route_template(api: Api) -> None:
    """Answers given by authentication and idempotency count under the route, not unmatched."""
    refused = await api.anonymous.get("/api/v1/agents/a1/notifications")
    assert refused.status_code == 401
    wrong = await api.anonymous.post(
        "/api/v1/agents/a1/events",
        json={"user_id": "u1", "event_type": "x"},
        headers={"Authorization": "Bearer dk_not_a_key"},
    )
    assert wrong.status_code == 401

    key = {"Idempotency-Key": "obs-key-1"}
    body = {"user_id": "u1", "event_type": "birthday"}
    first = await api.alpha.post("/api/v1/agents/a1/events", json=body, headers=key)
    replay = await api.alpha.post("/api/v1/agents/a1/events", json=body, headers=key)
    assert first.status_code == replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    reused = await api.alpha.post(
        "/api/v1/agents/a1/events", json={**body, "event_type": "other"}, headers=key
    )
    assert reused.status_code == 409

    text = await _metrics(api)
    assert _sample(text, "delivery_http_auth_failures_total", route=NOTIFICATIONS) == 1
    assert _sample(text, "delivery_http_auth_failures_total", route=EVENTS) == 1
    assert _sample(text, "delivery_http_idempotent_replays_total", route=EVENTS) == 1
    requests = "delivery_http_requests_total"
    assert _sample(text, requests, method="GET", route=NOTIFICATIONS, status="401") == 1
    assert _sample(text, requests, method="POST", route=EVENTS, status="401") == 1
    assert _sample(text, requests, method="POST", route=EVENTS, status="200") == 2
    assert _sample(text, requests, method="POST", route=EVENTS, status="409") == 1
    assert 'route="unmatched"' not in text

    # A path that matches no route is still unmatched.
    assert (await api.alpha.get("/api/v1/nowhere")).status_code == 404
    text = await _metrics(api)
    assert _sample(text, requests, method="GET", route="unmatched", status="404") == 1


async def test_one_info_line_per_request_with_route_status_and_duration(api: Api) -> None:
    """A successful request is logged once, at INFO, with its template, status and time."""
    with structlog.testing.capture_logs() as logs:
        response = await api.alpha.get(
            "/api/v1/agents/a1/notifications", headers={"X-Request-Id": "obs-req-1"}
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "obs-req-1"
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    (line,) = lines
    assert line["log_level"] == "info"
    assert (line["method"], line["route"], line["status"]) == ("GET", NOTIFICATIONS, 200)
    assert line["path"] == "/api/v1/agents/a1/notifications"
    assert isinstance(line["duration_ms"], float)


async def test_the_event_route_binds_the_message_id_into_its_access_line(api: Api) -> None:
    """The access line of an accepted event names the message it will become."""
    from delivery.domain import notification_id

    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        accepted = await api.alpha.post(
            "/api/v1/agents/a1/events", json={"user_id": "u1", "event_type": "birthday"}
        )
    event_id = accepted.json()["event_id"]
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["message_id"] == notification_id(event_id)
    assert (line["event_id"], line["agent_id"], line["user_id"]) == (event_id, "a1", "u1")
    assert line["request_id"] == accepted.headers["x-request-id"]


async def test_create_routes_bind_their_ids_only_once_accepted(api: Api) -> None:
    """
    An accepted wakeup's and schedule's access lines name what they created; a refused
    one's names no id, since nothing was created under it.
    """
    from delivery.domain import notification_id

    wakeups = "/api/v1/agents/a1/wakeups"
    schedules = "/api/v1/agents/a1/users/u1/schedules"
    wakeup = {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1}
    daily = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
    schedule = {"cadence": daily, "intent": "check in", "check_type": "reminder"}
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        made = await api.alpha.post(wakeups, json=wakeup)
        planned = await api.alpha.post(schedules, json=schedule)
        refused = await api.alpha.post(
            wakeups, json={**wakeup, "scheduled_at": "2000-01-01T00:00:00Z"}
        )
        unplanned = await api.alpha.post(schedules, json={**schedule, "cadence": {"simple": {}}})
    assert (made.status_code, planned.status_code) == (201, 201)
    assert (refused.status_code, unplanned.status_code) == (400, 400)
    lines = [entry for entry in logs if entry["event"] == "request"]
    wakeup_id = made.json()["wakeup_id"]
    assert lines[0]["wakeup_id"] == wakeup_id
    assert lines[0]["message_id"] == notification_id(wakeup_id)
    assert lines[1]["schedule_id"] == planned.json()["schedule_id"]
    for line in lines[2:]:
        assert not {"wakeup_id", "message_id", "schedule_id"} & set(line), line


async def test_a_keyed_replay_logs_the_ids_of_the_recorded_answer(api: Api) -> None:
    """
    A POST repeated with its ``Idempotency-Key`` runs the route again (which makes a
    fresh id) but answers from the record: its log lines name the recorded answer's
    ids, never the fresh one, which was never written. A reused key answered 409 names
    no created id at all.
    """
    from delivery.domain import notification_id

    wakeup = {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1}
    daily = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
    schedule = {"cadence": daily, "intent": "check in", "check_type": "reminder"}
    cases = [
        ("/api/v1/agents/a1/wakeups", wakeup, "wakeup_id", {**wakeup, "intent": "j"}),
        ("/api/v1/agents/a1/events", {"user_id": "u1", "event_type": "b"}, "event_id", None),
        ("/api/v1/agents/a1/users/u1/schedules", schedule, "schedule_id", None),
    ]
    created = {"wakeup_id", "event_id", "schedule_id", "message_id"}
    for path, body, name, other in cases:
        key = {"Idempotency-Key": f"replay-{name}"}
        first = await api.alpha.post(path, json=body, headers=key)
        assert first.status_code in (200, 201), first.text
        recorded = first.json()[name]
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            again = await api.alpha.post(path, json=body, headers=key)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()[name] == recorded
        expected = {name: recorded}
        if name != "schedule_id":
            expected["message_id"] = notification_id(recorded)
        access = [entry for entry in logs if entry["event"] == "request"]
        assert len(access) == 1
        for line in logs:
            assert {k: line[k] for k in created & set(line)} == expected, (path, line)
        if other is None:
            continue
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            reused = await api.alpha.post(path, json=other, headers=key)
        assert reused.status_code == 409
        for line in logs:
            assert not created & set(line), line


async def test_ready_names_the_failing_check(api: Api) -> None:
    """A schema made without migrations is not at the head: 503 naming `migrations`."""
    response = await api.anonymous.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["failing"] == ["migrations"]
    assert body["checks"]["database"] == "ok"
    assert "not at the shipped head" in body["checks"]["migrations"]
    # /health stays what it was: alive and the database answers.
    assert (await api.anonymous.get("/health")).status_code == 200
