"""
The official sonzai SDK's ``client.webhooks`` (sync and async) against the API under
uvicorn, on SQLite and PostgreSQL, with the strict generated models as shape checks
(no ``signing_secret`` on re-registration, attempts parsed ``extra='forbid'``).
"""

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
import sonzai
from sonzai._generated.models import (
    ListWebhooksOutputBody,
    PaginatedDeliveryAttemptsResponse,
    RotateSigningSecretOutputBody,
)
from sqlalchemy import select

from delivery.clock import ManualClock
from delivery.secrets import SecretBox
from delivery.store.engine import create_engine
from delivery.store.tables import IDEMPOTENCY
from delivery.store.webhooks import ENDPOINTS
from tests.api.server import serve_api
from tests.webhooks.helpers import EVENT, add_attempts, webhook_settings

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
HOOK = "http://127.0.0.1:9/hook"


def _seed_attempts(url: str, project_id: str, count: int) -> list[str]:
    async def run() -> list[str]:
        engine = create_engine(url)
        try:
            return await add_attempts(engine, project_id, EVENT, count, START)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _stored_endpoints(url: str) -> list[dict[str, object]]:
    async def run() -> list[dict[str, object]]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(ENDPOINTS))).mappings().all()
            return [dict(r) for r in rows]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_sync_sdk_webhook_lifecycle(database_url: str) -> None:
    """Register, re-register, list (masked header), rotate, page attempts, delete."""
    clock = ManualClock(START)
    with (
        serve_api(database_url, clock, settings=webhook_settings()) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        alpha = served.projects["alpha"]
        first = client.webhooks.register(EVENT, webhook_url=HOOK, auth_header="Bearer s3cret")
        assert first.success
        assert first.signing_secret.startswith("whsec_")

        again = client.webhooks.register(EVENT, webhook_url=HOOK + "2", auth_header="Bearer s3cret")
        assert again.success
        assert again.signing_secret == ""  # omitted on the wire, the H default

        listed = client.webhooks.list().webhooks
        assert [(w.event_type, w.webhook_url, w.is_active) for w in listed] == [
            (EVENT, HOOK + "2", True)
        ]
        assert listed[0].model_dump()["project_id"] == alpha
        assert listed[0].auth_header == "Bearer ****"
        strict = ListWebhooksOutputBody.model_validate(
            client.webhooks.list_webhooks_for_tenant().model_dump(mode="json", exclude_none=True)
        )
        assert strict.webhooks is not None
        assert len(strict.webhooks) == 1

        rotated = client.webhooks.rotate_secret(EVENT)
        assert rotated.signing_secret.startswith("whsec_")
        assert rotated.signing_secret != first.signing_secret
        strict_rotate = client.webhooks.rotate_webhook_signing_secret_for_tenant(EVENT)
        assert isinstance(strict_rotate, RotateSigningSecretOutputBody)

        ids = _seed_attempts(database_url, alpha, 5)
        attempts = list(client.webhooks.list_delivery_attempts(EVENT, page_size=2))
        assert [a.attempt_id for a in attempts] == list(reversed(ids))  # newest first
        assert attempts[0].response_code == 200
        assert attempts[1].error_message == "HTTP 500"
        page = client.webhooks.list_delivery_attempts_for_tenant(EVENT, page_size=2)
        assert isinstance(page, PaginatedDeliveryAttemptsResponse)
        assert page.has_more
        assert page.next_cursor

        assert client.webhooks.delete(EVENT).success
        assert client.webhooks.list().webhooks == []
        # The attempts outlive the endpoint (dead letters stay visible).
        assert len(client.webhooks.list_delivery_attempts(EVENT).to_list()) == 5
        assert client.webhooks.delete(EVENT).success  # idempotent: 204
        with pytest.raises(sonzai.NotFoundError):
            client.webhooks.rotate_secret(EVENT)


def test_secrets_are_encrypted_at_rest(database_url: str) -> None:
    """Neither the signing secret nor the auth header is stored in clear."""
    clock = ManualClock(START)
    settings = webhook_settings()
    with (
        serve_api(database_url, clock, settings=settings) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        secret = client.webhooks.register(
            EVENT, webhook_url=HOOK, auth_header="Bearer s3cret"
        ).signing_secret
    (row,) = _stored_endpoints(database_url)
    box = SecretBox.from_settings(settings)
    assert secret not in str(row)
    assert "s3cret" not in str(row)
    assert box.open(str(row["secret_enc"])) == secret
    assert box.open(str(row["auth_header_enc"])) == "Bearer s3cret"


def test_sync_sdk_project_scope_and_errors(database_url: str) -> None:
    """Project routes act on the key's project; a foreign id is 404; SSRF is 400."""
    clock = ManualClock(START)
    with (
        serve_api(database_url, clock, settings=webhook_settings()) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        alpha, beta = served.projects["alpha"], served.projects["beta"]
        reg = client.webhooks.register_for_project(alpha, "on_trigger_event", webhook_url=HOOK)
        assert reg.signing_secret.startswith("whsec_")
        listed = client.webhooks.list_for_project(alpha).webhooks
        assert [w.event_type for w in listed] == ["on_trigger_event"]
        assert listed[0].auth_header == ""
        assert client.webhooks.list().webhooks[0].model_dump()["project_id"] == alpha
        assert client.webhooks.rotate_secret_for_project(alpha, "on_trigger_event").success
        assert client.webhooks.list_delivery_attempts_for_project(alpha, EVENT).to_list() == []

        for call in (
            lambda: client.webhooks.list_for_project(beta),
            lambda: client.webhooks.register_for_project(beta, EVENT, webhook_url=HOOK),
            lambda: client.webhooks.delete_for_project(beta, "on_trigger_event"),
            lambda: client.webhooks.rotate_secret_for_project(beta, "on_trigger_event"),
            lambda: client.webhooks.list_delivery_attempts_for_project(beta, EVENT).to_list(),
        ):
            with pytest.raises(sonzai.NotFoundError):
                call()

        for url in (
            "http://169.254.169.254/latest",
            "http://10.0.0.7/hook",
            "ftp://example.com/x",
            "http://user:pw@127.0.0.1/hook",
            # 127.0.0.0/8 is allowlisted here; its 6to4 form still is not.
            "http://[2002:7f00:1::]/hook",
            "http://[2002:a9fe:a9fe::]/latest",
            "http://[fec0::1]/hook",
            "https://93.184.216.34/hook\r\nX-Injected: 1",
        ):
            with pytest.raises(sonzai.BadRequestError) as caught:
                client.webhooks.register(EVENT, webhook_url=url)
            assert caught.value.code == "INVALID_WEBHOOK_URL"
        with pytest.raises(sonzai.BadRequestError) as bad_header:
            client.webhooks.register(EVENT, webhook_url=HOOK, auth_header="Bearer a\r\nX: 1")
        assert bad_header.value.code == "INVALID_REQUEST"
        assert "auth_header" in str(bad_header.value)
        assert [w.event_type for w in client.webhooks.list().webhooks] == ["on_trigger_event"]

        with pytest.raises(sonzai.BadRequestError) as bad_size:
            client.webhooks.list_delivery_attempts(EVENT, page_size=500).to_list()
        assert bad_size.value.code == "INVALID_LIMIT"
        with httpx.Client(
            base_url=served.base_url, headers={"Authorization": f"Bearer {served.keys['alpha']}"}
        ) as raw:
            bad_cursor = raw.get(f"/api/v1/webhooks/{EVENT}/attempts", params={"cursor": "x"})
        assert bad_cursor.status_code == 400
        assert bad_cursor.json()["code"] == "INVALID_REQUEST"

        assert client.webhooks.delete_for_project(alpha, "on_trigger_event").success


async def test_async_sdk_webhook_lifecycle(database_url: str) -> None:
    """The async twins send the same requests and parse the same shapes."""
    clock = ManualClock(START)
    with serve_api(database_url, clock, settings=webhook_settings()) as served:
        async with sonzai.AsyncSonzai(
            api_key=served.keys["beta"], base_url=served.base_url
        ) as client:
            beta = served.projects["beta"]
            first = await client.webhooks.register(EVENT, webhook_url=HOOK)
            assert first.signing_secret.startswith("whsec_")
            again = await client.webhooks.register_for_project(beta, EVENT, webhook_url=HOOK)
            assert again.signing_secret == ""
            assert [w.webhook_url for w in (await client.webhooks.list()).webhooks] == [HOOK]
            assert len((await client.webhooks.list_for_project(beta)).webhooks) == 1
            rotated = await client.webhooks.rotate_secret(EVENT)
            assert rotated.signing_secret != first.signing_secret
            await asyncio.to_thread(_seed_attempts, database_url, beta, 3)
            tenant_page = await client.webhooks.list_delivery_attempts(EVENT, page_size=2)
            tenant = await tenant_page.to_list()
            project_page = await client.webhooks.list_delivery_attempts_for_project(
                beta, EVENT, page_size=1
            )
            project = await project_page.to_list()
            assert [a.attempt_id for a in tenant] == [a.attempt_id for a in project]
            assert len(tenant) == 3
            assert (await client.webhooks.delete_for_project(beta, EVENT)).success
            assert (await client.webhooks.delete(EVENT)).success  # idempotent: 204


def _stored_idempotency_bodies(url: str) -> list[str]:
    async def run() -> list[str]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(select(IDEMPOTENCY.c.response_body))
                return [str(r[0]) for r in rows]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_replayed_registration_shows_the_secret_but_never_stores_it_in_clear(
    database_url: str,
) -> None:
    """A retried first registration replays its secret; the idempotency record holds it sealed."""
    clock = ManualClock(START)
    with serve_api(database_url, clock, settings=webhook_settings()) as served:
        headers = {
            "Authorization": f"Bearer {served.keys['alpha']}",
            "Idempotency-Key": "retry-of-first-registration",
        }
        url = f"{served.base_url}/api/v1/webhooks/{EVENT}"
        with httpx.Client() as http:
            first = http.put(url, json={"webhook_url": HOOK}, headers=headers)
            again = http.put(url, json={"webhook_url": HOOK}, headers=headers)
    assert first.status_code == again.status_code == 200
    secret = first.json()["signing_secret"]
    assert secret.startswith("whsec_")
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    bodies = _stored_idempotency_bodies(database_url)
    assert bodies
    assert all("whsec_" not in body for body in bodies)


def test_agent_wakeup_is_refused_at_registration(database_url: str) -> None:
    """
    ``agent.wakeup`` (wakeups a context engine schedules itself) is never sent here:
    registering it, tenant- or project-scoped, is 400 naming event_type and pointing at
    on_wakeup_ready; nothing is stored.
    """
    with (
        serve_api(database_url, ManualClock(START), settings=webhook_settings()) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        for register in (
            lambda: client.webhooks.register("agent.wakeup", webhook_url=HOOK),
            lambda: client.webhooks.register_for_project(
                served.projects["alpha"], "agent.wakeup", webhook_url=HOOK
            ),
        ):
            with pytest.raises(sonzai.BadRequestError) as refused:
                register()
            assert refused.value.code == "UNSUPPORTED_EVENT_TYPE"
            assert refused.value.body is not None
            assert refused.value.body.errors
            assert refused.value.body.errors[0].field == "event_type"
            assert "on_wakeup_ready" in str(refused.value)
        assert client.webhooks.list().webhooks == []
        assert client.webhooks.register(EVENT, webhook_url=HOOK).signing_secret
    assert [e["event_type"] for e in _stored_endpoints(database_url)] == [EVENT]
