"""
``auth_header`` is sent verbatim as the ``Authorization`` header, so registration
refuses a value that cannot be an HTTP field value (RFC 9110 section 5.5) instead of
storing it and failing every delivery attempt; both databases, the API in-process.
"""

from delivery.secrets import SecretBox
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig
from tests.webhooks.helpers import EVENT

PUBLIC_HOOK = "https://93.184.216.34/hook"
UNSENDABLE = [
    "Bearer a\r\nX-Injected: 1",
    "Bearer a\nb",
    "Bearer a\rb",
    "Bearer a\x00b",
    "Bearer \x01",
    "Bearer \x1b[31m",
    "Bearer \x1f",
    "Bearer a\x7f",
    "Bearer caf\u00e9",
]


async def test_unsendable_auth_header_is_400_and_stores_nothing(rig: Rig) -> None:
    """CR, LF, NUL, other C0 controls, DEL or non-ASCII: 400 INVALID_REQUEST on auth_header."""
    alpha = rig.projects["alpha"]
    paths = (f"/api/v1/webhooks/{EVENT}", f"/api/v1/projects/{alpha}/webhooks/{EVENT}")
    for value in UNSENDABLE:
        for path in paths:
            body = {"webhook_url": PUBLIC_HOOK, "auth_header": value}
            response = await rig.api.put(path, json=body)
            assert response.status_code == 400, (value, response.text)
            error = response.json()
            assert error["code"] == "INVALID_REQUEST", (value, error)
            assert error["errors"][0]["field"] == "auth_header", (value, error)
            assert error["message"].startswith("auth_header "), (value, error)
            assert value not in error["message"], "the credential is not echoed"
    assert await rig.webhooks.list_endpoints(alpha) == []


async def test_refused_auth_header_leaves_the_registration_unchanged(rig: Rig) -> None:
    """A re-registration with a CRLF auth_header keeps the stored URL and header."""
    _receiver, url = rig.receiver()
    await rig.register(url, auth_header="Bearer good")
    response = await rig.api.put(
        f"/api/v1/webhooks/{EVENT}",
        json={"webhook_url": url + "2", "auth_header": "Bearer bad\r\nX-Injected: 1"},
    )
    assert response.status_code == 400, response.text
    (row,) = await rig.webhooks.list_endpoints(rig.projects["alpha"])
    assert row["url"] == url
    assert SecretBox.from_settings(rig.settings).open(row["auth_header_enc"]) == "Bearer good"


async def test_tab_in_auth_header_is_accepted_and_sent(rig: Rig) -> None:
    """A horizontal tab is legal inside an HTTP field value, so it is kept and delivered."""
    receiver, url = rig.receiver(Reply(200))
    await rig.register(url, auth_header="Custom a\tb")
    worker = rig.worker()
    (created,) = await rig.notify(1)
    assert await worker.enqueue([created]) == 1
    assert (await worker.sweep()).delivered == 1
    assert receiver.requests[0].headers["authorization"] == "Custom a\tb"
