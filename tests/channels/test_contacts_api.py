"""
Contacts, channel preferences and channel attempts over HTTP, on
SQLite and PostgreSQL: bad input is 400 with a code naming the field and writes nothing.
"""

from datetime import timedelta

from delivery.store.channels import MAX_CONTACTS_PER_USER
from tests.channels.conftest import Api

A, U = "agent-1", "user-1"
CONTACTS = f"/api/v1/agents/{A}/users/{U}/contacts"
PREFS = f"/api/v1/agents/{A}/users/{U}/channel-preferences"

BAD_CONTACTS = [
    ({"kind": "email", "destination": "not-an-email"}, "INVALID_CONTACT", "destination"),
    ({"kind": "email", "destination": "a@b"}, "INVALID_CONTACT", "destination"),
    ({"kind": "email", "destination": '"q"@example.com'}, "INVALID_CONTACT", "destination"),
    ({"kind": "sms", "destination": "4155550100"}, "INVALID_CONTACT", "destination"),
    ({"kind": "sms", "destination": "+0123456789"}, "INVALID_CONTACT", "destination"),
    ({"kind": "sms", "destination": "+1234"}, "INVALID_CONTACT", "destination"),
    ({"kind": "fcm", "destination": "x" * 5000}, "INVALID_CONTACT", "destination"),
    ({"kind": "fcm", "destination": "bad token!"}, "INVALID_CONTACT", "destination"),
    ({"kind": "fcm", "destination": "   "}, "INVALID_CONTACT", "destination"),
    ({"kind": "pigeon", "destination": "coo"}, "INVALID_CONTACT", "kind"),
    ({"kind": "email"}, "INVALID_REQUEST", "destination"),
    ({"kind": "email", "destination": 7}, "INVALID_REQUEST", "destination"),
    ({"kind": "sms", "destination": "+14155550100", "extra": 1}, "INVALID_REQUEST", "extra"),
]


async def test_bad_contacts_are_400_and_write_nothing(api: Api) -> None:
    """Each malformed contact answers 400 with its code and field, and stores nothing."""
    for body, code, field in BAD_CONTACTS:
        response = await api.alpha.post(CONTACTS, json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()
        assert (error["code"], error["errors"][0]["field"]) == (code, field), body
        assert field in error["message"], body
    listed = await api.alpha.get(CONTACTS)
    assert listed.json() == {"contacts": []}


async def test_contact_lifecycle(api: Api) -> None:
    """Add normalises and upserts; opt-out toggles; delete removes; 404 afterwards."""
    created = await api.alpha.post(
        CONTACTS, json={"kind": "sms", "destination": "+1 (415) 555-0100"}
    )
    assert created.status_code == 201
    sms = created.json()
    assert sms["destination"] == "+14155550100"
    assert sms["contact_id"].startswith("ct_")
    assert sms["opted_out"] is False
    assert sms["disabled"] is False
    assert set(sms) == {
        "contact_id", "agent_id", "user_id", "kind", "destination",
        "opted_out", "disabled", "created_at", "updated_at",
    }  # fmt: skip

    api.clock.advance(timedelta(seconds=1))
    again = await api.alpha.post(CONTACTS, json={"kind": "sms", "destination": "+14155550100"})
    assert again.status_code == 200
    assert again.json()["contact_id"] == sms["contact_id"]

    email = await api.alpha.post(
        CONTACTS, json={"kind": "email", "destination": "Ann@Bücher.Example", "opted_out": True}
    )
    assert email.status_code == 201
    assert email.json()["destination"] == "Ann@xn--bcher-kva.example"
    assert email.json()["opted_out"] is True

    listed = (await api.alpha.get(CONTACTS)).json()["contacts"]
    assert [c["kind"] for c in listed] == ["sms", "email"]

    url = f"{CONTACTS}/{sms['contact_id']}"
    patched = await api.alpha.patch(url, json={"opted_out": True})
    assert patched.status_code == 200
    assert patched.json()["opted_out"] is True
    assert (await api.alpha.get(url)).json()["opted_out"] is True

    assert (await api.alpha.delete(url)).status_code == 204
    gone = await api.alpha.get(url)
    assert gone.status_code == 404
    assert gone.json()["code"] == "NOT_FOUND"
    assert (await api.alpha.delete(url)).status_code == 204  # idempotent


async def test_contacts_are_tenant_isolated(api: Api) -> None:
    """Another project sees neither the list nor the contact, and cannot change it."""
    made = (
        await api.alpha.post(CONTACTS, json={"kind": "fcm", "destination": "tok:APA91b-x"})
    ).json()
    url = f"{CONTACTS}/{made['contact_id']}"
    assert (await api.beta.get(CONTACTS)).json() == {"contacts": []}
    assert (await api.beta.get(url)).status_code == 404
    assert (await api.beta.patch(url, json={"opted_out": True})).status_code == 404
    assert (await api.beta.delete(url)).status_code == 204  # as for an unknown id
    assert (await api.alpha.get(url)).json()["opted_out"] is False


async def test_preferences_round_trip_and_reject_unknown_kinds(api: Api) -> None:
    """
    Preferences keep their order (the channel fallback's) without repeats; an unknown
    kind is INVALID_CONTACT.
    """
    assert (await api.alpha.get(PREFS)).json() == {"preferences": {}}
    body = {"preferences": {"reminder": ["sms", "email", "sms"], "*": ["fcm"], "quiet": []}}
    put = await api.alpha.put(PREFS, json=body)
    assert put.status_code == 200
    expected = {"reminder": ["sms", "email"], "*": ["fcm"], "quiet": []}
    assert put.json() == {"preferences": expected}
    assert (await api.alpha.get(PREFS)).json() == {"preferences": expected}

    bad = await api.alpha.put(PREFS, json={"preferences": {"reminder": ["sms", "fax"]}})
    assert bad.status_code == 400
    assert bad.json()["code"] == "INVALID_CONTACT"
    assert bad.json()["errors"][0]["field"] == "preferences.reminder"
    assert (await api.alpha.get(PREFS)).json() == {"preferences": expected}
    assert (await api.beta.get(PREFS)).json() == {"preferences": {}}


async def test_attempts_listing_starts_empty_and_checks_limit(api: Api) -> None:
    """The attempts log answers an array, and an out-of-range limit is INVALID_LIMIT."""
    url = f"/api/v1/agents/{A}/users/{U}/channel-attempts"
    assert (await api.alpha.get(url)).json() == {"attempts": []}
    bad = await api.alpha.get(url, params={"limit": "0"})
    assert bad.status_code == 400
    assert bad.json()["code"] == "INVALID_LIMIT"


async def test_contacts_per_user_are_capped(api: Api) -> None:
    """The 51st destination of one user is refused; re-adding an existing one still works."""
    for i in range(MAX_CONTACTS_PER_USER):
        made = await api.alpha.post(
            CONTACTS, json={"kind": "email", "destination": f"u{i}@example.com"}
        )
        assert made.status_code == 201
    over = await api.alpha.post(CONTACTS, json={"kind": "email", "destination": "x@example.com"})
    assert over.status_code == 400
    assert over.json()["code"] == "INVALID_CONTACT"
    again = await api.alpha.post(CONTACTS, json={"kind": "email", "destination": "u0@example.com"})
    assert again.status_code == 200
    listed = (await api.alpha.get(CONTACTS)).json()["contacts"]
    assert len(listed) == MAX_CONTACTS_PER_USER
