"""
API key management: the store's list / revoke / rotate, the ``/admin/v1`` routes
guarded by the admin token, and ``delivery keys`` on the command line.
"""

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.sql import SqlStore
from tests.api.conftest import START

ADMIN = "admin-token-0123456789abcdef0123"
QUEUE = "/api/v1/agents/a1/notifications"


def _client(app: object, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://api.test",
        headers=headers,
    )


async def test_store_lists_revokes_and_rotates(engine: AsyncEngine) -> None:
    """Revoking is idempotent; a rotation's old key works until its grace ends, then not."""
    keys = SqlStore(engine).keys
    alpha = await keys.ensure_project("alpha", START)
    beta = await keys.ensure_project("beta", START)
    first = await keys.create_api_key(alpha.id, START)
    await keys.create_api_key(beta.id, START + timedelta(seconds=1))
    listed = await keys.list_keys()
    assert [(k.project_name, k.prefix, k.revoked_at) for k in listed] == [
        ("alpha", first[:12], None),
        ("beta", listed[1].prefix, None),
    ]
    [only] = await keys.list_keys("alpha")
    rotated = await keys.rotate_key(only.id, START, grace=timedelta(hours=1))
    assert rotated is not None
    info, second = rotated
    assert (info.project_id, info.prefix) == (alpha.id, second[:12])
    assert await keys.project_for_key(first, START + timedelta(minutes=59)) == alpha.id
    assert await keys.project_for_key(first, START + timedelta(hours=1)) is None
    assert await keys.project_for_key(second, START + timedelta(days=1)) == alpha.id
    # Revoking now cuts the grace short; revoking again keeps the first instant.
    revoked = await keys.revoke_key(only.id, START + timedelta(minutes=5))
    assert revoked is not None
    assert revoked.revoked_at == START + timedelta(minutes=5)
    again = await keys.revoke_key(only.id, START + timedelta(minutes=9))
    assert again is not None
    assert again.revoked_at == START + timedelta(minutes=5)
    assert await keys.rotate_key(only.id, START + timedelta(minutes=10)) is None
    assert await keys.rotate_key("key_unknown", START) is None
    assert await keys.revoke_key("key_unknown", START) is None


async def test_rotating_a_key_in_its_grace_never_lengthens_it(engine: AsyncEngine) -> None:
    keys = SqlStore(engine).keys
    alpha = await keys.ensure_project("alpha", START)
    first = await keys.create_api_key(alpha.id, START)
    [only] = await keys.list_keys("alpha")
    assert await keys.rotate_key(only.id, START, grace=timedelta(hours=1)) is not None
    # Rotated again, still in its grace, with a longer grace: the first end holds.
    assert await keys.rotate_key(only.id, START + timedelta(minutes=30), grace=timedelta(days=1))
    assert await keys.project_for_key(first, START + timedelta(minutes=59)) == alpha.id
    assert await keys.project_for_key(first, START + timedelta(hours=1)) is None
    # A shorter grace the second time ends it sooner.
    second_listed = [k for k in await keys.list_keys("alpha") if k.revoked_at is None]
    newest = second_listed[0]
    assert await keys.rotate_key(newest.id, START, grace=timedelta(hours=2))
    assert await keys.rotate_key(newest.id, START + timedelta(minutes=1), grace=timedelta(0))
    [ended] = [k for k in await keys.list_keys("alpha") if k.id == newest.id]
    assert ended.revoked_at == START + timedelta(minutes=1)


async def test_admin_routes_do_not_exist_without_a_token(engine: AsyncEngine) -> None:
    """Unset DELIVERY_ADMIN_TOKEN: 404 as for any unknown route, even with a tenant key."""
    store = SqlStore(engine)
    project = await store.keys.ensure_project("alpha", START)
    key = await store.keys.create_api_key(project.id, START)
    app = create_app(Settings(subject_prefix="test"), store, ManualClock(START))
    async with _client(app, key) as client:
        listed = await client.get("/admin/v1/keys")
        created = await client.post("/admin/v1/keys", json={"project": "x"})
    assert (listed.status_code, created.status_code) == (404, 404)
    assert listed.json()["code"] == "NOT_FOUND"
    assert len(await store.keys.list_keys()) == 1


async def test_admin_routes_manage_keys(engine: AsyncEngine) -> None:
    """Create, list, rotate with grace and revoke over HTTP; the keys work (or not) on /api."""
    clock = ManualClock(START)
    store = SqlStore(engine)
    settings = Settings(subject_prefix="test", admin_token=SecretStr(ADMIN))
    app = create_app(settings, store, clock, auth_cache_ttl_s=0)
    async with _client(app, ADMIN) as admin, _client(app, None) as anonymous:
        created = await admin.post("/admin/v1/keys", json={"project": "alpha"})
        assert created.status_code == 201
        key = created.json()["key"]
        tenant = {"Authorization": f"Bearer {key}"}
        assert (await anonymous.get(QUEUE, headers=tenant)).status_code == 200
        # A tenant key is not the admin token, and neither is nothing.
        assert (await anonymous.get("/admin/v1/keys", headers=tenant)).status_code == 401
        assert (await anonymous.get("/admin/v1/keys")).status_code == 401

        [listed] = (await admin.get("/admin/v1/keys", params={"project": "alpha"})).json()["keys"]
        assert listed["prefix"] == key[:12]
        assert "key" not in listed
        rotated = await admin.post(
            f"/admin/v1/keys/{listed['id']}/rotate", json={"grace_seconds": 60}
        )
        assert rotated.status_code == 200
        new_key = rotated.json()["key"]
        assert rotated.json()["replaces"] == listed["id"]
        fresh = {"Authorization": f"Bearer {new_key}"}
        assert (await anonymous.get(QUEUE, headers=tenant)).status_code == 200
        assert (await anonymous.get(QUEUE, headers=fresh)).status_code == 200
        clock.advance(timedelta(seconds=61))
        assert (await anonymous.get(QUEUE, headers=tenant)).status_code == 401
        assert (await anonymous.get(QUEUE, headers=fresh)).status_code == 200

        revoked = await admin.post(f"/admin/v1/keys/{rotated.json()['id']}/revoke")
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"] is not None
        assert (await anonymous.get(QUEUE, headers=fresh)).status_code == 401

        unknown = await admin.post("/admin/v1/keys/key_nope/revoke")
        assert (unknown.status_code, unknown.json()["code"]) == (404, "NOT_FOUND")
        dead = await admin.post(f"/admin/v1/keys/{listed['id']}/rotate")
        assert dead.status_code == 404
        blank = await admin.post("/admin/v1/keys", json={"project": "  "})
        assert (blank.status_code, blank.json()["code"]) == (400, "INVALID_REQUEST")
        too_long = await admin.post(
            f"/admin/v1/keys/{listed['id']}/rotate", json={"grace_seconds": 10**9}
        )
        assert too_long.status_code == 400
    assert len(await store.keys.list_keys()) == 2


async def test_revocation_takes_effect_within_the_cache_time(engine: AsyncEngine) -> None:
    """A key revoked while cached keeps working for at most the cache time, then is refused."""
    store = SqlStore(engine)
    project = await store.keys.ensure_project("alpha", START)
    key = await store.keys.create_api_key(project.id, START)
    ttl = 2.0
    app = create_app(
        Settings(subject_prefix="test"), store, ManualClock(START), auth_cache_ttl_s=ttl
    )
    async with _client(app, key) as client:
        assert (await client.get(QUEUE)).status_code == 200  # now cached
        [info] = await store.keys.list_keys()
        await store.keys.revoke_key(info.id, START)
        assert (await client.get(QUEUE)).status_code == 200  # the cache still holds it
        await asyncio.sleep(ttl + 0.1)
        refused = await client.get(QUEUE)
    assert (refused.status_code, refused.json()["code"]) == (401, "UNAUTHORIZED")


def test_keys_commands(tmp_path: Path) -> None:
    """`delivery keys create | list | rotate | revoke` against the embedded database."""
    env = {
        **os.environ,
        "DELIVERY_DATA_DIR": str(tmp_path / "data"),
        "DELIVERY_DATABASE_URL": "",
        "DELIVERY_LOG_LEVEL": "WARNING",
    }
    cli = [sys.executable, "-m", "delivery", "keys"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=60)

    key = run("create", "--project", "demo").stdout.strip()
    assert key.startswith("dlv_")
    [line] = run("list", "--json").stdout.splitlines()
    listed = json.loads(line)
    assert (listed["project"], listed["prefix"], listed["revoked_at"]) == ("demo", key[:12], None)
    rotated = run("rotate", listed["id"], "--grace-seconds", "0")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip()
    assert new_key.startswith("dlv_")
    assert new_key != key
    text = run("list", "--project", "demo").stdout
    assert f"{key[:12]}…  demo  revoked " in text
    assert f"{new_key[:12]}…  demo  active" in text
    new_id = next(
        json.loads(x)["id"]
        for x in run("list", "--json").stdout.splitlines()
        if json.loads(x)["revoked_at"] is None
    )
    revoked = run("revoke", new_id)
    assert revoked.returncode == 0, revoked.stderr
    assert "within 30 s" in revoked.stderr
    assert all(json.loads(x)["revoked_at"] for x in run("list", "--json").stdout.splitlines())
    unknown = run("revoke", "key_nope")
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "no key with id 'key_nope'")
