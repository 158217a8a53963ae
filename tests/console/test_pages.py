"""
The console's pages through the real app (ASGI), on SQLite and PostgreSQL: the session
and its cookie, CSRF refusals, another project's ids, masked secrets, and what each
page says.
"""

from datetime import UTC, datetime, timedelta

from delivery import metrics
from delivery.api.console.figures import read_figures
from delivery.api.console.words import cadence_words, local_fires
from delivery.store.webhooks import NewNotification
from handlers.webhooks.worker import WebhookWorker
from tests.console.conftest import (
    START,
    USER,
    A,
    Rig,
    U,
    advance,
    create_schedule,
    csrf_of,
    sign_in,
)
from tests.handlers.webhooks.stub import Reply, ScriptedReceiver
from tests.webhooks.helpers import EVENT, add_notifications, notification_row

NOT_FOUND = "There is nothing here with that id."


async def test_pages_need_a_valid_session(rig: Rig) -> None:
    """No cookie, a forged cookie or a wrong key: sign-in, never a page."""
    async with rig.browser() as browser:
        for path in ("/console/users", "/console/webhooks", "/console/health"):
            response = await browser.get(path)
            assert response.status_code == 303
            assert response.headers["location"].startswith("/console/sign-in?next=")
        browser.cookies.set("delivery_console", "forged.value.sig", path="/console")
        assert (await browser.get("/console/users")).status_code == 303
        wrong = await sign_in(browser, "sk_wrong")
        assert wrong.status_code == 401
        assert "not valid" in wrong.text
        assert "delivery_console=" not in wrong.headers.get("set-cookie", "")


async def test_sign_in_cookie_is_strict_httponly_and_sealed(rig: Rig) -> None:
    """The session cookie is HttpOnly, SameSite=Strict, and does not hold the key in clear."""
    async with rig.browser() as browser:
        response = await sign_in(browser, rig.keys["alpha"])
        assert response.status_code == 303
        assert response.headers["location"] == "/console/users"
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("delivery_console=")
        )
        lowered = cookie.lower()
        assert "httponly" in lowered
        assert "samesite=strict" in lowered
        assert "path=/console" in lowered
        assert rig.keys["alpha"] not in cookie
        page = await browser.get("/console/users")
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert rig.projects["alpha"] in page.text
        assert rig.keys["alpha"] not in page.text
        # Signing out drops the cookie: the next page asks to sign in again.
        signed_out = await browser.post("/console/sign-out", data={"csrf": csrf_of(page.text)})
        assert signed_out.status_code == 303
        assert (await browser.get("/console/users")).status_code == 303


async def test_forms_without_the_csrf_token_are_refused(rig: Rig) -> None:
    """Sign-in and every write need the token; a refused write changes nothing."""
    sid = await create_schedule(rig.alpha)
    async with rig.browser() as browser:
        await browser.get("/console/sign-in")
        refused = await browser.post(
            "/console/sign-in", data={"api_key": rig.keys["alpha"], "csrf": "nope"}
        )
        assert refused.status_code == 403
        await sign_in(browser, rig.keys["alpha"])
        action = f"/console/users/{A}/{U}/schedules/{sid}/enabled"
        for form in ({"enabled": "false"}, {"enabled": "false", "csrf": "x" * 32}):
            response = await browser.post(action, data=form)
            assert response.status_code == 403
            assert "CSRF" in response.text
        schedule = (await rig.alpha.get(f"{USER}/schedules/{sid}")).json()
        assert schedule["enabled"] is True
        assert schedule["next_fire_at"]


async def test_disable_clears_next_fire_at_and_enable_restores_it(rig: Rig) -> None:
    """The schedule page's button is the API's PATCH: disabled means no next fire."""
    sid = await create_schedule(rig.alpha)
    page_url = f"/console/users/{A}/{U}/schedules/{sid}"
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["alpha"])
        page = await browser.get(page_url)
        assert "every weekday at 03:00 and 08:30 in Europe/London, 07:00-21:00" in page.text
        assert '<dd id="next-fire-at">2026-05-01T07:30:00Z</dd>' in page.text
        done = await browser.post(
            page_url + "/enabled", data={"csrf": csrf_of(page.text), "enabled": "false"}
        )
        assert done.status_code == 303
        after = await browser.get(done.headers["location"])
        assert '<dd id="next-fire-at">—</dd>' in after.text
        assert "Schedule disabled" in after.text
        api = (await rig.alpha.get(f"{USER}/schedules/{sid}")).json()
        assert (api["enabled"], api["next_fire_at"]) == (False, "")
        await browser.post(
            page_url + "/enabled", data={"csrf": csrf_of(after.text), "enabled": "true"}
        )
        api = (await rig.alpha.get(f"{USER}/schedules/{sid}")).json()
        assert api["enabled"] is True
        assert api["next_fire_at"]


async def test_user_page_shows_skip_reasons_explain_and_pending(rig: Rig) -> None:
    """Skipped ticks say why; explain answers for an instant; pending messages are listed."""
    await create_schedule(rig.alpha)
    await advance(rig.alpha, 30)
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["alpha"])
        found = await browser.get("/console/users", params={"agent": "agent_", "user": "user_"})
        assert f"/console/users/{A}/{U}" in found.text
        exact = await browser.get("/console/users", params={"agent": A, "user": U})
        assert exact.headers["location"] == f"/console/users/{A}/{U}"
        page = await browser.get(f"/console/users/{A}/{U}")
        assert "outside the active window (07:00-21:00)" in page.text
        assert "reason: outside_active_window" in page.text
        assert "+01:00" in page.text  # local times beside UTC
        assert "Z</span>" in page.text
        assert "Nothing pending." not in page.text
        asked = await browser.get(
            f"/console/users/{A}/{U}", params={"at": "2026-05-01T02:00:00Z", "window": "1h"}
        )
        assert "outside the active window" in asked.text
        assert 'class="answer no"' in asked.text
        bad = await browser.get(f"/console/users/{A}/{U}", params={"at": "yesterday"})
        assert bad.status_code == 200
        assert 'role="alert"' in bad.text


async def test_another_projects_ids_are_the_same_404_as_unknown_ones(rig: Rig) -> None:
    """beta signed in sees alpha's user, schedule and endpoint exactly as unknown ids."""
    sid = await create_schedule(rig.alpha)
    await advance(rig.alpha, 30)
    put = await rig.alpha.put(
        f"/api/v1/webhooks/{EVENT}", json={"webhook_url": "http://127.0.0.1:9/hook"}
    )
    assert put.status_code == 200
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["beta"])
        pages = {}
        for name, path in {
            "user": f"/console/users/{A}/{U}",
            "schedule": f"/console/users/{A}/{U}/schedules/{sid}",
            "webhook": f"/console/webhooks/{EVENT}",
            "unknown_user": "/console/users/nobody/nothing",
            "unknown_schedule": f"/console/users/{A}/{U}/schedules/sch_nothing",
            "unknown_webhook": "/console/webhooks/on_nothing",
        }.items():
            response = await browser.get(path)
            assert response.status_code == 404, (name, response.text)
            assert NOT_FOUND in response.text
            pages[name] = response.text
        assert len(set(pages.values())) == 1  # byte for byte the same page
        page = await browser.get("/console/users")
        foreign = await browser.post(
            f"/console/users/{A}/{U}/schedules/{sid}/enabled",
            data={"csrf": csrf_of(page.text), "enabled": "false"},
        )
        assert foreign.status_code == 404
        assert (await rig.alpha.get(f"{USER}/schedules/{sid}")).json()["enabled"] is True
        listed = await browser.get("/console/webhooks")
        assert "127.0.0.1:9" not in listed.text


async def test_no_page_shows_a_secret(rig: Rig, http_server: object) -> None:
    """Auth headers are masked, signing secrets and API keys never appear."""
    registered = await rig.alpha.put(
        f"/api/v1/webhooks/{EVENT}",
        json={"webhook_url": "http://127.0.0.1:9/hook", "auth_header": "Bearer tenant-s3cret"},
    )
    signing_secret = registered.json()["signing_secret"]
    await create_schedule(rig.alpha)
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["alpha"])
        seen = ""
        for path in (
            "/console/users",
            "/console/webhooks",
            f"/console/webhooks/{EVENT}",
            "/console/health",
            f"/console/users/{A}/{U}",
        ):
            response = await browser.get(path)
            assert response.status_code == 200, path
            seen += response.text
        assert "Bearer ****" in seen
        for secret in ("tenant-s3cret", signing_secret, signing_secret[6:], rig.keys["alpha"]):
            assert secret not in seen


async def test_resend_and_recover_from_the_webhook_page(rig: Rig, http_server: object) -> None:
    """Resend queues the attempt's message through the worker; recover reports it queued."""
    receiver = ScriptedReceiver([Reply(200)])
    url = http_server(receiver) + "/hook"  # type: ignore[operator]
    await rig.alpha.put(f"/api/v1/webhooks/{EVENT}", json={"webhook_url": url})
    row = notification_row(rig.projects["alpha"], 1, rig.clock.now())
    await add_notifications(rig.engine, [row])
    worker = WebhookWorker(rig.app.state.ctx.settings, rig.engine, clock=rig.clock)
    try:
        await worker.enqueue([NewNotification(row["id"], rig.projects["alpha"], EVENT)])
        assert (await worker.sweep()).delivered == 1
        async with rig.browser() as browser:
            await sign_in(browser, rig.keys["alpha"])
            page = await browser.get(f"/console/webhooks/{EVENT}")
            assert "success 200" in page.text
            attempt_id = page.text.split('name="id" value="', 1)[1].split('"', 1)[0]
            done = await browser.post(
                f"/console/webhooks/{EVENT}/resend",
                data={"csrf": csrf_of(page.text), "id": attempt_id},
            )
            assert done.headers["location"].endswith("notice=resent")
            again = await browser.post(
                f"/console/webhooks/{EVENT}/resend",
                data={"csrf": csrf_of(page.text), "id": attempt_id},
            )
            assert again.headers["location"].endswith("notice=already")
            assert (await worker.sweep()).delivered == 1
            assert len(receiver.requests) == 2
            rig.clock.advance(timedelta(minutes=1))
            recovered = await browser.post(
                f"/console/webhooks/{EVENT}/recover",
                data={"csrf": csrf_of(page.text), "since": "2026-04-30T00:00:00Z"},
            )
            assert recovered.headers["location"].endswith("notice=recovered")
            listing = await browser.get("/console/webhooks")
            assert "100% (2/2)" in listing.text
    finally:
        await worker.stop()


async def test_health_reads_the_ready_checks_and_metrics(rig: Rig) -> None:
    """The ready checks and the figures read from /metrics."""
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["alpha"])
        page = await browser.get("/console/health")
        assert page.status_code == 200
        assert "database" in page.text
        assert '<dd id="fires-hour">0 ' in page.text
        metrics.SCHEDULER_FIRES.labels("fired").inc(5)  # what a scheduler pass adds
        again = await browser.get("/console/health")
        assert '<dd id="fires-hour">5 ' in again.text


async def test_docs_assets_are_served_locally(rig: Rig) -> None:
    """/docs names only local assets, and they are served."""
    async with rig.browser() as browser:
        docs = await browser.get("/docs")
        assert docs.status_code == 200
        assert "cdn" not in docs.text.lower()
        assert "/docs/assets/swagger-ui-bundle.js" in docs.text
        js = await browser.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200
        assert len(js.content) > 100_000
        css = await browser.get("/docs/assets/swagger-ui.css")
        assert css.status_code == 200
        redoc = await browser.get("/redoc")
        assert redoc.status_code == 200
        assert "/docs/assets/redoc.standalone.js" in redoc.text
        assert "cdn" not in redoc.text.lower()
        assert "fonts.googleapis" not in redoc.text


def test_cadence_in_words() -> None:
    """Sentences for the cadence kinds, with the window."""
    weekday = (
        '{"simple":{"days_of_week":["mon","tue","wed","thu","fri"],'
        '"frequency":"weekly","times":["08:30"]}}'
    )
    window = '{"hours":{"end":"21:00","start":"07:00"}}'
    assert (
        cadence_words(weekday, "Europe/London", window)
        == "every weekday at 08:30 in Europe/London, 07:00-21:00"
    )
    daily = '{"simple":{"frequency":"daily","times":["07:00","19:00"]}}'
    assert cadence_words(daily, "UTC", None) == "every day at 07:00 and 19:00 in UTC"
    hours = '{"simple":{"frequency":"interval_hours","interval_hours":4}}'
    assert cadence_words(hours, "Asia/Tokyo", None) == "every 4 hours in Asia/Tokyo"
    two = '{"simple":{"days_of_week":["mon","thu"],"frequency":"weekly","times":["09:00"]}}'
    assert cadence_words(two, "UTC", None) == "every Monday and Thursday at 09:00 in UTC"


def test_next_fires_mark_the_dst_change() -> None:
    """London's clocks go back on 2026-10-25: the first fire after it is marked."""
    fires = [
        datetime(2026, 10, 24, 7, 30, tzinfo=UTC),
        datetime(2026, 10, 25, 8, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 8, 30, tzinfo=UTC),
    ]
    shown = local_fires(fires, "Europe/London", datetime(2026, 10, 23, tzinfo=UTC))
    assert [f.local for f in shown] == [
        "2026-10-24T08:30:00+01:00",
        "2026-10-25T08:30:00+00:00",
        "2026-10-26T08:30:00+00:00",
    ]
    assert [f.dst_change for f in shown] == [None, "clocks go back: +01:00 → +00:00", None]


def test_figures_from_the_exposition() -> None:
    """Fires, lateness p99 and backlog read from Prometheus text."""
    text = "\n".join(
        [
            "# TYPE delivery_scheduler_fires_total counter",
            'delivery_scheduler_fires_total{outcome="fired"} 90.0',
            'delivery_scheduler_fires_total{outcome="skipped"} 10.0',
            "# TYPE delivery_scheduler_fire_lateness_seconds histogram",
            'delivery_scheduler_fire_lateness_seconds_bucket{le="0.1"} 50.0',
            'delivery_scheduler_fire_lateness_seconds_bucket{le="1.0"} 98.0',
            'delivery_scheduler_fire_lateness_seconds_bucket{le="5.0"} 100.0',
            'delivery_scheduler_fire_lateness_seconds_bucket{le="+Inf"} 100.0',
            "delivery_scheduler_fire_lateness_seconds_count 100.0",
            "delivery_scheduler_fire_lateness_seconds_sum 12.0",
            "# TYPE delivery_outbox_backlog gauge",
            "delivery_outbox_backlog 7.0",
            "",
        ]
    )
    figures = read_figures(text)
    assert (figures.fires_total, figures.skips_total) == (90.0, 10.0)
    assert figures.lateness_p99_s == 5.0
    assert figures.outbox_backlog == 7.0


async def test_an_advanced_pairs_pages_use_its_clock(rig: Rig) -> None:
    """After advance-time the next fires start at the pair's now, as the API's do."""
    sid = await create_schedule(rig.alpha)
    await advance(rig.alpha, 24 * 5)
    api = (await rig.alpha.get(f"{USER}/schedules/{sid}")).json()
    async with rig.browser() as browser:
        await sign_in(browser, rig.keys["alpha"])
        page = (await browser.get(f"/console/users/{A}/{U}/schedules/{sid}")).text
    first = page.split('<ol class="fires">', 1)[1].split('<time datetime="', 1)[1]
    first_fire = datetime.fromisoformat(first.split('"', 1)[0])
    assert first_fire == datetime.fromisoformat(api["next_fire_at"].replace("Z", "+00:00"))
    assert first_fire > START + timedelta(days=5)
