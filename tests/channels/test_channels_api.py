"""
Notification channel input rules over HTTP (in-process, both databases): every bad
write is 400 with a code naming the field and stores nothing, and
another project's channels stay invisible (invariant 6).
"""

from typing import Any

from tests.channels.conftest import Api

HOOK = {"url": "http://127.0.0.1:9/hook"}
BAD_WRITES: list[tuple[dict[str, Any], str, str]] = [
    (
        {"name": "x", "type": "composio", "config": {"agent_id": "a"}},
        "UNSUPPORTED_CHANNEL_TYPE",
        "type",
    ),
    ({"name": "x", "type": "fcm"}, "UNSUPPORTED_CHANNEL_TYPE", "type"),
    ({"name": "", "type": "webhook", "config": HOOK}, "INVALID_REQUEST", "name"),
    ({"name": "a\x00b", "type": "webhook", "config": HOOK}, "INVALID_REQUEST", "name"),
    ({"name": "n" * 129, "type": "webhook", "config": HOOK}, "INVALID_REQUEST", "name"),
    ({"type": "webhook", "config": HOOK}, "INVALID_REQUEST", "name"),
    ({"name": "x", "type": "webhook"}, "INVALID_REQUEST", "config.url"),
    (
        {"name": "x", "type": "webhook", "config": {"url": "http://10.1.2.3/h"}},
        "INVALID_WEBHOOK_URL",
        "config.url",
    ),
    (
        {"name": "x", "type": "webhook", "config": {"url": "ftp://h/x"}},
        "INVALID_WEBHOOK_URL",
        "config.url",
    ),
    (
        {"name": "x", "type": "webhook", "config": {"url": "http://[2002:7f00:1::]/h"}},
        "INVALID_WEBHOOK_URL",
        "config.url",
    ),
    (
        {"name": "x", "type": "webhook", "config": {"url": "http://[fec0::1]/h"}},
        "INVALID_WEBHOOK_URL",
        "config.url",
    ),
    (
        {"name": "x", "type": "webhook", "config": {**HOOK, "secret": "whsec_!!"}},
        "INVALID_REQUEST",
        "config.secret",
    ),
    (
        {"name": "x", "type": "webhook", "config": {**HOOK, "auth_header": "Bearer a\r\nX: 1"}},
        "INVALID_REQUEST",
        "config.auth_header",
    ),
    (
        {"name": "x", "type": "webhook", "config": {**HOOK, "auth_header": "Bearer a\x00"}},
        "INVALID_REQUEST",
        "config.auth_header",
    ),
    (
        {"name": "x", "type": "webhook", "config": {**HOOK, "auth_header": "Bearer \x7f"}},
        "INVALID_REQUEST",
        "config.auth_header",
    ),
    (
        {"name": "x", "type": "email", "config": {"from": "nobody"}},
        "INVALID_REQUEST",
        "config.from",
    ),
    (
        {"name": "x", "type": "email", "config": {"to": ["a@example.com", "b@"]}},
        "INVALID_REQUEST",
        "config.to.1",
    ),
    ({"name": "x", "type": "email", "config": {"to": []}}, "INVALID_REQUEST", "config.to"),
    (
        {"name": "x", "type": "email", "events": [f"e{i}" for i in range(65)]},
        "INVALID_REQUEST",
        "events",
    ),
    ({"name": "x", "type": "email", "events": ["ok", ""]}, "INVALID_REQUEST", "events.1"),
    ({"name": "x", "type": "email", "config": {"blob": "x" * 20000}}, "INVALID_REQUEST", "config"),
    ({"name": "x", "type": "email", "colour": "red"}, "INVALID_REQUEST", "colour"),
]


async def test_bad_channel_writes_are_400_and_store_nothing(api: Api) -> None:
    """Each rule break names its field and code; the list stays empty afterwards."""
    for body, code, field in BAD_WRITES:
        response = await api.alpha.post("/api/v1/channels", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert (error["code"], error["errors"][0]["field"]) == (code, field), (body, error)
    assert (await api.alpha.get("/api/v1/channels")).json() == {"channels": []}


async def test_update_rules_and_tenancy(api: Api) -> None:
    """PUT replaces in full, keeps an omitted webhook secret, and 404s across projects."""
    made = await api.alpha.post(
        "/api/v1/channels", json={"name": "hook", "type": "webhook", "config": HOOK}
    )
    assert made.status_code == 201
    channel = made.json()
    secret = channel["config"]["secret"]
    url = f"/api/v1/channels/{channel['channel_id']}"

    replaced = await api.alpha.put(
        url, json={"name": "hook 2", "type": "webhook", "config": {"url": HOOK["url"]}}
    )
    assert replaced.status_code == 200
    assert replaced.json()["config"]["secret"] == f"****{secret[-4:]}", "secret kept"
    assert replaced.json()["events"] == []
    assert "filter" not in replaced.json()

    bad = await api.alpha.put(url, json={"name": "hook 3", "type": "composio"})
    assert bad.json()["code"] == "UNSUPPORTED_CHANNEL_TYPE"
    injected = await api.alpha.put(
        url,
        json={"name": "hook 3", "type": "webhook", "config": {**HOOK, "auth_header": "a\nb"}},
    )
    assert injected.json()["errors"][0]["field"] == "config.auth_header"
    assert (await api.alpha.get(url)).json()["name"] == "hook 2", "a refused PUT changes nothing"

    beta_project = api.projects["beta"]
    assert (await api.beta.get(url)).status_code == 404
    assert (await api.beta.put(url, json={"name": "x", "type": "email"})).status_code == 404
    assert (await api.beta.delete(url)).status_code == 204  # as for an unknown id
    foreign = f"/api/v1/projects/{beta_project}/channels"
    assert (await api.alpha.get(foreign)).status_code == 404
    assert (await api.alpha.post(f"{foreign}/deliver", json={"event_type": "e"})).status_code == 404
    mine = f"/api/v1/projects/{api.projects['alpha']}/channels/{channel['channel_id']}"
    assert (await api.alpha.get(mine)).json()["name"] == "hook 2"

    empty = await api.alpha.post("/api/v1/channels/deliver", json={"event_type": ""})
    assert empty.status_code == 400
    assert empty.json()["errors"][0]["field"] == "event_type"
    assert (await api.alpha.delete(url)).status_code == 204
    assert (await api.alpha.get(url)).status_code == 404
