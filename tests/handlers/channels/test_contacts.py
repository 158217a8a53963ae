"""Contact validation and channel preferences (pure)."""

import pytest

from delivery.errors import InvalidContactError
from handlers.contacts import (
    ALL_KINDS,
    FCM_TOKEN_MAX_LENGTH,
    Contact,
    ContactKind,
    channels_for,
    redact,
    validate_contact,
    validate_preferences,
)

FCM_TOKEN = "dGVzdC1pbnN0YW5jZQ:APA91bH" + "x" * 140


@pytest.mark.parametrize(
    ("kind", "destination", "expected"),
    [
        ("sms", "+14155550100", "+14155550100"),
        ("sms", "+1 (415) 555-0100", "+14155550100"),
        ("sms", "+44 20 7946 0958", "+442079460958"),
        ("sms", "+491701234567", "+491701234567"),
        ("sms", "+123456789012345", "+123456789012345"),
        ("email", "ada@example.com", "ada@example.com"),
        ("email", "Ada.Lovelace+news@Example.COM", "Ada.Lovelace+news@example.com"),
        ("email", "  ada@example.com\n", "ada@example.com"),
        ("email", "o'brien@mail.example.ie", "o'brien@mail.example.ie"),
        ("email", "user@bücher.example", "user@xn--bcher-kva.example"),
        ("email", "x@sub-domain.example.co.uk", "x@sub-domain.example.co.uk"),
        ("fcm", FCM_TOKEN, FCM_TOKEN),
        ("fcm", f"  {FCM_TOKEN} ", FCM_TOKEN),
        ("fcm", "a" * FCM_TOKEN_MAX_LENGTH, "a" * FCM_TOKEN_MAX_LENGTH),
    ],
    ids=[
        "sms-plain",
        "sms-us-formatted",
        "sms-uk-spaces",
        "sms-de-mobile",
        "sms-15-digits",
        "email-plain",
        "email-domain-lowercased-local-kept",
        "email-whitespace-trimmed",
        "email-apostrophe",
        "email-idna-domain",
        "email-hyphen-and-subdomains",
        "fcm-token",
        "fcm-token-trimmed",
        "fcm-token-max-length",
    ],
)
def test_valid_contacts_are_normalised(kind: str, destination: str, expected: str) -> None:
    """A valid destination comes back in its canonical form, kind parsed."""
    contact = validate_contact(kind, destination)
    assert contact == Contact(ContactKind(kind), expected, opted_out=False)


@pytest.mark.parametrize(
    ("kind", "destination", "field", "fragment"),
    [
        ("pager", "+14155550100", "kind", "kind must be one of fcm, email, sms"),
        ("", "x", "kind", "kind must be one of"),
        ("SMS", "+14155550100", "kind", "kind must be one of"),
        ("sms", "4155550100", "destination", "E.164"),
        ("sms", "+04155550100", "destination", "E.164"),
        ("sms", "+1415555", "destination", "E.164"),
        ("sms", "+1234567890123456", "destination", "E.164"),
        ("sms", "+1 415 CALL NOW", "destination", "E.164"),
        ("sms", "", "destination", "E.164"),
        ("email", "ada.example.com", "destination", "email address"),
        ("email", "ada@", "destination", "email address"),
        ("email", "@example.com", "destination", "email address"),
        ("email", "ada@localhost", "destination", "invalid domain"),
        ("email", "ada@@example.com", "destination", "invalid local part"),
        ("email", "a da@example.com", "destination", "invalid local part"),
        ("email", ".ada@example.com", "destination", "invalid local part"),
        ("email", "ada..b@example.com", "destination", "invalid local part"),
        ("email", '"quoted"@example.com', "destination", "invalid local part"),
        ("email", "zoë@example.com", "destination", "invalid local part"),
        ("email", "ada@exa_mple.com", "destination", "invalid domain"),
        ("email", "ada@-example.com", "destination", "invalid domain"),
        ("email", "ada@example..com", "destination", "domain"),
        ("email", "ada@example.123", "destination", "invalid domain"),
        ("email", "a" * 65 + "@example.com", "destination", "invalid local part"),
        ("email", "ada@" + "a" * 64 + ".com", "destination", "domain"),
        ("email", "ada@" + ".".join(["a" * 60] * 5) + ".com", "destination", "domain"),
        ("email", "ada@example.com\r\nBcc: x@evil.example", "destination", "invalid local part"),
        ("email", "ada@example.com\r\nBcc: x", "destination", "domain"),
        ("fcm", "", "destination", "non-empty"),
        ("fcm", "   ", "destination", "non-empty"),
        ("fcm", "a" * (FCM_TOKEN_MAX_LENGTH + 1), "destination", "too long"),
        ("fcm", "token with spaces", "destination", "only letters"),
        ("fcm", "tok\u00e9n", "destination", "only letters"),
    ],
    ids=[
        "unknown-kind",
        "empty-kind",
        "kind-is-case-sensitive",
        "sms-no-plus",
        "sms-leading-zero",
        "sms-too-short",
        "sms-too-long",
        "sms-letters",
        "sms-empty",
        "email-no-at",
        "email-no-domain",
        "email-no-local",
        "email-single-label-domain",
        "email-two-ats",
        "email-space",
        "email-leading-dot",
        "email-double-dot",
        "email-quoted-local",
        "email-non-ascii-local",
        "email-underscore-domain",
        "email-label-leading-hyphen",
        "email-empty-label",
        "email-numeric-tld",
        "email-local-too-long",
        "email-label-too-long",
        "email-domain-too-long",
        "email-header-injection",
        "email-header-injection-in-domain",
        "fcm-empty",
        "fcm-blank",
        "fcm-oversized",
        "fcm-spaces",
        "fcm-non-ascii",
    ],
)
def test_invalid_contacts_are_rejected_naming_the_field(
    kind: str, destination: str, field: str, fragment: str
) -> None:
    """A malformed destination or unknown kind is INVALID_CONTACT naming the field."""
    with pytest.raises(InvalidContactError) as caught:
        validate_contact(kind, destination)
    error = caught.value
    assert error.field == field
    assert fragment in error.message
    assert field in error.message
    assert error.code == "INVALID_CONTACT"
    assert error.status == 400
    assert error.to_body()["errors"][0]["field"] == field


def test_opt_out_flag_is_carried() -> None:
    """The opt-out flag survives validation unchanged."""
    assert validate_contact("email", "a@example.com", opted_out=True).opted_out is True


@pytest.mark.parametrize(
    ("check_type", "preferences", "expected"),
    [
        ("daily", None, ALL_KINDS),
        ("daily", {}, ALL_KINDS),
        ("daily", {"weekly": ["sms"]}, ALL_KINDS),
        ("daily", {"daily": ["email"]}, {ContactKind.EMAIL}),
        ("daily", {"daily": ["email", "fcm"]}, {ContactKind.EMAIL, ContactKind.FCM}),
        ("daily", {"daily": []}, set()),
        ("daily", {"*": ["fcm"]}, {ContactKind.FCM}),
        ("daily", {"*": ["fcm"], "daily": ["sms"]}, {ContactKind.SMS}),
        ("daily", {"daily": [ContactKind.SMS]}, {ContactKind.SMS}),
        ("daily", {"daily": ["sms", "carrier-pigeon"]}, {ContactKind.SMS}),
    ],
    ids=[
        "no-preferences-means-all",
        "empty-preferences-means-all",
        "other-check-type-only",
        "one-channel",
        "two-channels",
        "explicitly-none",
        "default-entry",
        "specific-beats-default",
        "enum-values",
        "stale-unknown-kind-ignored",
    ],
)
def test_channels_for(
    check_type: str, preferences: dict[str, list[str]] | None, expected: set[ContactKind]
) -> None:
    """Preferences resolve check_type, then "*", then every channel."""
    assert channels_for(check_type, preferences) == frozenset(expected)


def test_validate_preferences_normalises_kinds() -> None:
    """Valid preferences come back as frozensets of kinds."""
    assert validate_preferences({"daily": ["sms", "email"], "*": []}) == {
        "daily": frozenset({ContactKind.SMS, ContactKind.EMAIL}),
        "*": frozenset(),
    }


@pytest.mark.parametrize(
    ("preferences", "field"),
    [
        ({"daily": ["sms", "telegram"]}, "preferences.daily"),
        ({"daily": "sms"}, "preferences.daily"),
        ({"": ["sms"]}, "preferences"),
    ],
    ids=["unknown-kind", "string-not-list", "empty-check-type"],
)
def test_validate_preferences_rejects(preferences: dict[str, object], field: str) -> None:
    """Bad preferences are INVALID_CONTACT naming the offending entry."""
    with pytest.raises(InvalidContactError) as caught:
        validate_preferences(preferences)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert field in caught.value.message


@pytest.mark.parametrize(
    ("kind", "destination", "expected"),
    [
        (ContactKind.FCM, FCM_TOKEN, "…xxxxxx"),
        (ContactKind.EMAIL, "ada@example.com", "…@example.com"),
        (ContactKind.SMS, "+14155550100", "…0100"),
    ],
    ids=["fcm", "email", "sms"],
)
def test_redact_hides_the_destination(kind: ContactKind, destination: str, expected: str) -> None:
    """Log lines carry only a correlatable fragment of a destination."""
    assert redact(kind, destination) == expected
