"""
PURE: validate and normalise a user's destinations (``fcm`` / ``email`` / ``sms``) and
resolve per-user channel preferences. No I/O, no clock, no store, no httpx imports.

The contacts REST API calls :func:`validate_contact` on every write
and stores the normalised destination it returns; the fan-out (``handlers.fanout``) calls
:func:`channels_for` on every message. Every rejection is an
:class:`~delivery.errors.InvalidContactError` (400 ``INVALID_CONTACT``) whose ``field`` is
the offending input and whose message names it.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from delivery.errors import InvalidContactError


class ContactKind(StrEnum):
    """A destination kind; the values are the wire values of the contacts API."""

    FCM = "fcm"
    EMAIL = "email"
    SMS = "sms"


ALL_KINDS: frozenset[ContactKind] = frozenset(ContactKind)

#: Preference key that applies to every ``check_type`` without its own entry.
DEFAULT_PREFERENCE = "*"

# FCM registration tokens are opaque but, in practice, URL-safe base64 plus ``:`` (the
# ``<instance id>:APA91b...`` form) and occasionally ``-``/``_``/``.``. 4096 is far above
# any token FCM issues (~160-200 chars) and bounds what we store and send.
FCM_TOKEN_MAX_LENGTH = 4096
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:.\-]+")

# E.164 (ITU-T E.164 section 6.2.1): at most 15 digits, country codes never start with 0.
# The lower bound of 8 digits rejects obvious truncations; no assigned country plan is
# shorter than that in practice for SMS-capable numbers.
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
# Separators people type; stripped before the E.164 check so "+1 (415) 555-0100" works.
_PHONE_SEPARATORS = re.compile(r"[\s().\-]")

# RFC 5322 section 3.2.3 ``atext``, used as a dot-atom in the local part. Quoted local parts
# and comments are legal but never needed by real mailboxes and are a classic injection
# vector, so this "sane subset" rejects them. Non-ASCII local parts would need SMTPUTF8
# (RFC 6531), which we do not negotiate, so they are rejected too.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# RFC 1035 section 2.3.1 LDH label after IDNA encoding.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")
# RFC 5321 section 4.5.3.1: local part <= 64 octets, domain <= 255; the forward-path
# limit of 256 octets including the angle brackets leaves 254 for the address itself.
EMAIL_LOCAL_MAX = 64
EMAIL_DOMAIN_MAX = 253
EMAIL_MAX = 254


@dataclass(frozen=True, slots=True)
class Contact:
    """
    One destination of one user, as the fan-out sees it.

    ``destination`` is already normalised (:func:`validate_contact`); ``opted_out``
    contacts are kept (the user may opt back in) but never sent to.
    """

    kind: ContactKind
    destination: str
    opted_out: bool = False


def parse_kind(kind: str, *, field: str = "kind") -> ContactKind:
    """
    Turn a wire kind into a :class:`ContactKind`.

    Raises:
        InvalidContactError: ``kind`` is not ``fcm``, ``email`` or ``sms``.
    """
    try:
        return ContactKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ContactKind)
        raise InvalidContactError(
            field, f"{field} must be one of {allowed}; got {kind!r}"
        ) from None


def normalize_phone(value: str, *, field: str = "destination") -> str:
    """
    Validate an SMS number and return it in canonical E.164 (``+`` and digits only).

    Spaces, dots, hyphens and parentheses are accepted as separators and removed; a
    national number without the leading ``+`` and country code is rejected because we
    cannot guess the country.

    Raises:
        InvalidContactError: not an E.164 number (``+`` then 8 to 15 digits, the first
            digit not ``0``).
    """
    compact = _PHONE_SEPARATORS.sub("", value)
    if not _E164.fullmatch(compact):
        raise InvalidContactError(
            field,
            f"{field} must be an E.164 phone number: '+', a country code and 8 to 15 "
            f"digits in total, e.g. +14155550100; got {value!r}",
        )
    return compact


def normalize_email(value: str, *, field: str = "destination") -> str:
    """
    Validate an email address and return it normalised for SMTP.

    The local part is kept as typed (it is case-sensitive per RFC 5321 section 2.4); the
    domain is lowercased and converted to its IDNA ASCII form (``bücher.example`` becomes
    ``xn--bcher-kva.example``), so it can be used in ``RCPT TO`` without SMTPUTF8.

    Raises:
        InvalidContactError: not a ``local@domain`` address of the supported subset:
            dot-atom ASCII local part of at most 64 octets, a domain of at least two LDH
            labels (after IDNA) of at most 63 octets each and 253 in total, a
            non-numeric top-level label, and at most 254 octets overall.
    """
    address = value.strip()
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise InvalidContactError(
            field, f"{field} must be an email address like name@example.com; got {value!r}"
        )
    if len(local) > EMAIL_LOCAL_MAX or not _LOCAL_PART.fullmatch(local):
        raise InvalidContactError(
            field,
            f"{field} has an invalid local part {local!r}: use at most {EMAIL_LOCAL_MAX} "
            "ASCII letters, digits or !#$%&'*+/=?^_`{|}~- separated by single dots",
        )
    ascii_domain = _idna_domain(domain, field)
    normalised = f"{local}@{ascii_domain}"
    if len(normalised) > EMAIL_MAX:
        raise InvalidContactError(
            field, f"{field} is longer than {EMAIL_MAX} characters: {len(normalised)}"
        )
    return normalised


def _idna_domain(domain: str, field: str) -> str:
    try:
        # Python's "idna" codec implements IDNA 2003 (RFC 3490) and nameprep: enough to
        # turn a Unicode domain into the A-label form mail servers accept.
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidContactError(
            field, f"{field} has a domain that is not a valid (IDNA) host name: {domain!r}"
        ) from None
    labels = ascii_domain.split(".")
    if (
        len(ascii_domain) > EMAIL_DOMAIN_MAX
        or len(labels) < 2
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise InvalidContactError(
            field,
            f"{field} has an invalid domain {domain!r}: it needs at least two labels of "
            "letters, digits and inner hyphens, like example.com",
        )
    return ascii_domain


def normalize_fcm_token(value: str, *, field: str = "destination") -> str:
    """
    Validate an FCM registration token and return it without surrounding whitespace.

    Raises:
        InvalidContactError: empty, longer than :data:`FCM_TOKEN_MAX_LENGTH`, or with
            characters outside ``A-Z a-z 0-9 _ : . -``.
    """
    token = value.strip()
    if not token:
        raise InvalidContactError(field, f"{field} must be a non-empty FCM registration token")
    if len(token) > FCM_TOKEN_MAX_LENGTH:
        raise InvalidContactError(
            field,
            f"{field} is too long for an FCM registration token: {len(token)} characters, "
            f"at most {FCM_TOKEN_MAX_LENGTH}",
        )
    if not _FCM_TOKEN.fullmatch(token):
        raise InvalidContactError(
            field,
            f"{field} is not an FCM registration token: only letters, digits and _ : . - "
            "are allowed",
        )
    return token


def normalize_destination(
    kind: ContactKind, destination: str, *, field: str = "destination"
) -> str:
    """
    Validate ``destination`` for ``kind`` and return its canonical form.

    Two destinations are the same contact exactly when their canonical forms are equal,
    so the store can put a unique constraint on ``(agent, user, kind, destination)``.

    Raises:
        InvalidContactError: the destination is malformed for its kind.
    """
    match kind:
        case ContactKind.FCM:
            return normalize_fcm_token(destination, field=field)
        case ContactKind.EMAIL:
            return normalize_email(destination, field=field)
        case ContactKind.SMS:
            return normalize_phone(destination, field=field)


def validate_contact(kind: str, destination: str, *, opted_out: bool = False) -> Contact:
    """
    Validate one contact write (``{"kind", "destination", "opted_out"}``) and normalise it.

    Raises:
        InvalidContactError: ``kind`` is unknown (field ``kind``) or ``destination`` is
            malformed for it (field ``destination``).
    """
    parsed = parse_kind(kind)
    return Contact(parsed, normalize_destination(parsed, destination), opted_out)


def validate_preferences(
    preferences: Mapping[str, Iterable[str]], *, field: str = "preferences"
) -> dict[str, frozenset[ContactKind]]:
    """
    Validate per-user channel preferences: ``{check_type or "*": [kind, ...]}``.

    An empty list is allowed and means "never reach me through a channel for this
    check_type" (the message still lands in the polling queue).

    Raises:
        InvalidContactError: a kind is unknown (field ``preferences.<check_type>``) or a
            key is empty.
    """
    result: dict[str, frozenset[ContactKind]] = {}
    for check_type, kinds in preferences.items():
        if not check_type:
            raise InvalidContactError(field, f"{field} keys must be non-empty check types")
        if isinstance(kinds, str):
            # A bare string is iterable too; "sms" would silently become {"s", "m"}.
            raise InvalidContactError(
                f"{field}.{check_type}", f"{field}.{check_type} must be a list of kinds"
            )
        result[check_type] = frozenset(
            parse_kind(kind, field=f"{field}.{check_type}") for kind in kinds
        )
    return result


def channels_for(
    check_type: str, preferences: Mapping[str, Iterable[ContactKind | str]] | None
) -> frozenset[ContactKind]:
    """
    The channels a message of ``check_type`` may use for one user.

    Resolution order: the entry for ``check_type``, else the :data:`DEFAULT_PREFERENCE`
    (``"*"``) entry, else every kind (no preference means no restriction). Unknown kinds
    in stored preferences are ignored rather than raised: they were validated on write
    by :func:`validate_preferences`, and a stale value must never stop delivery.
    """
    if not preferences:
        return ALL_KINDS
    if check_type in preferences:
        chosen = preferences[check_type]
    elif DEFAULT_PREFERENCE in preferences:
        chosen = preferences[DEFAULT_PREFERENCE]
    else:
        return ALL_KINDS
    allowed = {kind.value for kind in ContactKind}
    return frozenset(ContactKind(kind) for kind in chosen if kind in allowed)


def redact(kind: ContactKind, destination: str) -> str:
    """
    A log-safe stand-in for a destination: enough to correlate, not enough to contact.

    Device tokens are bearer credentials for pushing to a device and addresses and
    numbers are personal data, so log lines carry ``…<last 6>`` of a token, the domain
    of an address, or the last 4 digits of a number.
    """
    match kind:
        case ContactKind.FCM:
            return f"…{destination[-6:]}"
        case ContactKind.EMAIL:
            return f"…@{destination.rpartition('@')[2]}"
        case ContactKind.SMS:
            return f"…{destination[-4:]}"
