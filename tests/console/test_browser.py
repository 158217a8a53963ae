"""
The console end to end in headless Chromium, on SQLite and PostgreSQL: sign in with the
keyboard, find a user, read a skip reason, disable a schedule and see ``next_fire_at``
clear, resend a webhook and see the second attempt the worker made. Also at 360 px
wide: nothing overflows sideways.
"""

from datetime import timedelta

from playwright.async_api import Route, expect

from delivery.store.webhooks import NewNotification
from handlers.webhooks.worker import WebhookWorker
from tests.console.browser import chromium, serving
from tests.console.conftest import A, Rig, U, advance, create_schedule
from tests.fixtures.http import ServeApp
from tests.handlers.webhooks.stub import Reply, ScriptedReceiver
from tests.webhooks.helpers import EVENT, add_notifications, notification_row


async def test_operator_journey_in_chromium(rig: Rig, http_server: ServeApp) -> None:
    """Sign in, find, read why, disable, resend: each as a person would in the browser."""
    await create_schedule(rig.alpha)
    await advance(rig.alpha, 30)
    receiver = ScriptedReceiver([Reply(200)])
    url = http_server(receiver) + "/hook"
    registered = await rig.alpha.put(f"/api/v1/webhooks/{EVENT}", json={"webhook_url": url})
    assert registered.status_code == 200
    row = notification_row(rig.projects["alpha"], 1, rig.clock.now())
    await add_notifications(rig.engine, [row])
    worker = WebhookWorker(rig.app.state.ctx.settings, rig.engine, clock=rig.clock)
    await worker.enqueue([NewNotification(row["id"], rig.projects["alpha"], EVENT)])
    assert (await worker.sweep()).delivered == 1

    try:
        async with serving(rig.app) as base, chromium() as browser:
            page = await browser.new_page()
            await page.goto(base + "/console")
            await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            # The key field has focus: type and press Enter, no mouse.
            await page.keyboard.type(rig.keys["alpha"])
            await page.keyboard.press("Enter")
            await expect(page.get_by_role("heading", name="Users")).to_be_visible()

            await page.get_by_label("Agent id").fill(A)
            await page.get_by_label("User id").fill(U)
            await page.get_by_role("button", name="Find").click()
            await expect(page.get_by_role("heading", name=f"User {U}")).to_be_visible()
            skipped = page.locator(".kind-fire-skipped").first
            await expect(skipped).to_contain_text("outside the active window (07:00-21:00)")
            await expect(skipped).to_contain_text("reason: outside_active_window")

            await page.get_by_role("link", name="reminder").click()
            schedule_path = page.url.removeprefix(base)
            await expect(page.locator("#next-fire-at")).to_have_text("2026-05-04T07:30:00Z")
            await expect(page.locator(".words")).to_have_text(
                "every weekday at 03:00 and 08:30 in Europe/London, 07:00-21:00"
            )
            await page.get_by_role("button", name="Disable").click()
            await expect(page.get_by_role("status")).to_have_text(
                "Schedule disabled: it has no next fire."
            )
            await expect(page.locator("#next-fire-at")).to_have_text("—")
            await expect(page.locator("#state")).to_have_text("disabled")

            await page.get_by_role("link", name="Webhooks").click()
            await expect(page.get_by_role("cell", name="100% (1/1)")).to_be_visible()
            await page.get_by_role("link", name=EVENT).click()
            await page.get_by_role("button", name=f"Resend message {row['id']}").click()
            await expect(page.get_by_role("status")).to_have_text("Queued to be sent again.")
            rig.clock.advance(timedelta(seconds=1))
            assert (await worker.sweep()).delivered == 1
            await page.reload()
            await expect(page.locator(".attempts > li")).to_have_count(2)
            await expect(page.locator(".attempts > li").first).to_contain_text("#2")
            assert len(receiver.requests) == 2

            narrow = await browser.new_page(viewport={"width": 360, "height": 740})
            await narrow.context.add_cookies(await page.context.cookies())
            for path in (
                "/console/users?agent=agent_&user=user_",
                f"/console/users/{A}/{U}",
                schedule_path,
                "/console/webhooks",
                f"/console/webhooks/{EVENT}",
                "/console/health",
            ):
                await narrow.goto(base + path)
                await expect(narrow.get_by_role("button", name="Sign out")).to_be_visible()
                width = await narrow.evaluate("document.documentElement.scrollWidth")
                assert width <= 360, (path, width)
    finally:
        await worker.stop()


async def test_swagger_docs_render_with_no_network(rig: Rig) -> None:
    """/docs renders the API in Chromium with every request off the machine refused."""
    async with serving(rig.app) as base, chromium() as browser:
        page = await browser.new_page()
        outside: list[str] = []

        async def local_only(route: Route) -> None:
            if route.request.url.startswith(base):
                await route.continue_()
            else:
                outside.append(route.request.url)
                await route.abort()

        await page.route("**/*", local_only)
        await page.goto(base + "/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("sonzai-delivery")
        await expect(page.locator(".opblock-tag-section").first).to_be_visible()
        assert outside == []
