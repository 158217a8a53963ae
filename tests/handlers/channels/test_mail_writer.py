"""
MailWriter against the stdlib: the bytes it writes parse, under the stdlib's strict
parser, to the message ``build_email`` builds (every header, both parts' content), and
keep the wire rules: CRLF only, 7-bit, lines within 78 characters (Message-ID, which
cannot fold, within 998), RFC 2047 for non-ASCII header text.
"""

import email
import email.policy
import re
from email.message import EmailMessage

from aiosmtplib.email import flatten_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.email import MailWriter, build_email, subject_for
from tests.handlers.channels.conftest import make_message

DATE = "Fri, 04 Dec 2026 21:00:00 +0000"
HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "X-Delivery-Event-Id",
    "MIME-Version",
)
# Text as users and models write it: any Unicode but surrogates, with the characters
# that stress a writer (line breaks of every kind, "=", ".", "=?", long runs).
TEXT = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(["\n", "\r\n", "\r", "=", ".", "=?", "?=", " ", "\t", "é", "🌅"]),
        st.just("x" * 90),
    ),
    max_size=200,
).map("".join)


def _parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _content(part: EmailMessage) -> str:
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def _check(sender: str, recipient: str, **fields: object) -> None:
    message = make_message(**fields)
    raw = MailWriter(sender).write(message, recipient=recipient, date=DATE)
    assert raw is not None
    expected = _parse(
        flatten_message(
            build_email(message, sender=sender, recipient=recipient, date=DATE), cte_type="7bit"
        )
    )
    mail = _parse(raw)

    assert raw.isascii()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None, "a bare CR or LF"
    for line in raw.split(b"\r\n"):
        limit = 998 if line.startswith(b"Message-ID: ") else 78
        assert len(line) <= limit, line
    assert not mail.defects
    exact = {"Subject": subject_for(message), "X-Delivery-Event-Id": message.event_id}
    for name in HEADERS:
        if name in exact:
            # The intended text exactly: the stdlib loses spaces next to encoded words
            # and around an all-blank value, and writes "=?...?=" unencoded.
            assert mail.get_all(name) == [exact[name]], name
        elif name == "Message-ID":
            # The stdlib folds a long one onto a line of its own, so it reads back with
            # the folding space in front; the id itself is the same.
            assert [str(mail[name])] == [str(expected[name]).lstrip()]
        else:
            assert mail.get_all(name) == expected.get_all(name), name
        header = mail[name]
        assert not getattr(header, "defects", ()), (name, header.defects)
    assert mail.get_content_type() == "multipart/alternative"
    parts = list(mail.iter_parts())
    wanted = list(expected.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part, want in zip(parts, wanted, strict=True):
        assert isinstance(part, EmailMessage)
        assert isinstance(want, EmailMessage)
        assert not part.defects
        assert part.get_content_charset() == "utf-8"
        assert _content(part) == _content(want)


def test_a_plain_message_matches_the_stdlib() -> None:
    """The common case: ASCII text, a short subject, 7bit parts."""
    _check(
        "Sonzai <notify@mail.example.com>",
        "ada@example.com",
        generated_message="Good morning!\n\n.A line starting with a dot\nx=1",
    )


def test_non_ascii_subject_and_sender_name_use_rfc_2047() -> None:
    """A non-ASCII subject goes as encoded words; the sender's name as the stdlib folds it."""
    text = "Grüße, Zoë! 🌅 " + "très long " * 30
    _check("Zoë Sonzai <notify@mail.example.com>", "ada@example.com", generated_message=text)
    raw = MailWriter("Zoë <n@mail.example.com>").write(
        make_message(generated_message=text), recipient="ada@example.com", date=DATE
    )
    assert raw is not None
    assert b"Subject: =?utf-8?b?" in raw


def test_text_that_looks_like_an_encoded_word_reads_back_as_written() -> None:
    """A subject or event id holding "=?...?=" is not decoded by the reader."""
    literal = "=?utf-8?q?hello?= world"
    raw = MailWriter("n@mail.example.com").write(
        make_message(payload={"subject": literal}), recipient="ada@example.com", date=DATE
    )
    assert raw is not None
    assert _parse(raw)["Subject"] == literal
    # The stdlib writes it as is, so its own parser reads "hello world".
    assert (
        _parse(
            flatten_message(
                build_email(
                    make_message(payload={"subject": literal}),
                    sender="n@mail.example.com",
                    recipient="ada@example.com",
                    date=DATE,
                )
            )
        )["Subject"]
        == "hello world"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=TEXT,
    subject=st.one_of(st.none(), TEXT),
    event_id=st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=120
    ),
)
def test_any_text_matches_the_stdlib(text: str, subject: str | None, event_id: str) -> None:
    """Whatever the message, subject and event id, the parsed result is the stdlib's."""
    payload = {} if subject is None else {"subject": subject}
    _check(
        "Sonzai Bot <notify@mail.example.com>",
        "someone.else+tag@sub.example.org",
        generated_message=text,
        payload=payload,
        event_id=event_id,
    )


def test_recipients_it_cannot_write_plainly_fall_back_to_the_stdlib() -> None:
    """A quoted or non-ASCII address is left to the stdlib (``None``)."""
    writer = MailWriter("notify@mail.example.com")
    for recipient in ['"a b"@example.com', "zoë@example.com", "a@b@c", ""]:
        assert writer.write(make_message(), recipient=recipient, date=DATE) is None
