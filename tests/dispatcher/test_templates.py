"""
Message templates: the built-in defaults read as messages, the sandbox refuses what
it must, and a project's template writes real fires' messages, on both databases
and through a real JetStream dispatcher.
"""

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.messages import FireCreated, WakeupDue
from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.app import Dispatcher
from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.messages import Messages, TemplateBooks
from delivery.dispatcher.process import Processor
from delivery.domain import IntentBlock, InventoryItem, SourceKind, SourceRef, notification_id
from delivery.errors import InvalidTemplateError
from delivery.settings import Settings
from delivery.store.templates import TemplateStore
from delivery.templates import _local, _local_of, check_template, default_message, kinds_of
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)
IBUPROFEN = InventoryItem("Ibuprofen", {"dosage": "500mg", "frequency": "twice daily"})
MEDICATION_INTENT = "Remind the user to take their ibuprofen at the correct dose"


def _schedule(check_type: str, intent: str, item: InventoryItem | None = None) -> IntentBlock:
    return schedule_block(
        intent=intent,
        check_type=check_type,
        fire_at_local="2026-05-02T09:00:00+08:00",
        item=item,
        metadata={"campaign": "v2"},
    )


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            _schedule("medication", MEDICATION_INTENT, IBUPROFEN),
            "Hi! Just a reminder: time to take your Ibuprofen (500mg).",
        ),
        (
            _schedule("reminder", MEDICATION_INTENT, IBUPROFEN),
            "Hi! Just a reminder: time to take your ibuprofen at the correct dose (500mg).",
        ),
        (
            _schedule("reminder", "remind them to drink a glass of water"),
            "Hi! Just a reminder: time to drink a glass of water.",
        ),
        (
            _schedule("check_in", "check in on how the user is feeling"),
            "Hi! Just checking in on how you are feeling.",
        ),
        (
            _schedule("daily_checkin", "say good morning"),
            "Hi! Just checking in. How are you doing today?",
        ),
        (
            wakeup_block(
                intent="wish them well",
                check_type="birthday",
                fire_at=datetime(2026, 6, 15, 9, tzinfo=UTC),
                occasion="Sarah's 30th birthday",
                interest_topic=None,
                event_description=None,
            ),
            "Hi! Just a reminder: it's Sarah's 30th birthday.",
        ),
        (
            wakeup_block(
                intent="ask how it went",
                check_type="follow_up",
                fire_at=datetime(2026, 6, 15, 9, tzinfo=UTC),
                occasion=None,
                interest_topic=None,
                event_description="the job interview",
            ),
            "Hi! How did the job interview go?",
        ),
        (
            event_block(
                event_type="level_up",
                event_description="The user just reached level 25",
                occurred_at=datetime(2026, 5, 2, tzinfo=UTC),
                metadata=None,
            ),
            "Congratulations! You just reached level 25!",
        ),
        (
            event_block(
                event_type="purchase",
                event_description="The user bought their first plant",
                occurred_at=datetime(2026, 5, 2, tzinfo=UTC),
                metadata=None,
            ),
            "Hi! Just saw this: you bought your first plant.",
        ),
    ],
    ids=[
        "medication",
        "reminder-with-item",
        "reminder",
        "check-in",
        "check-in-generic",
        "birthday",
        "follow-up",
        "level-up",
        "event",
    ],
)
def test_default_messages_read_as_messages(block: IntentBlock, expected: str) -> None:
    """The built-in default speaks to the user; it never restates the agent's instruction."""
    assert default_message(block) == expected


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("Hi {{ name", "is not a valid template: line 1"),
        ("Hi {{ nmae }}", "'nmae' is undefined"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ intent.format(1) }}", "unsafe"),
        ("{% set x = 1 %}{{ x }}", "'set' is not available"),
        ("{% macro f() %}{% endmacro %}", "'macro' is not available"),
        ("{% include 'x' %}", "'include' is not available"),
        ("{{ intent|center(9) }}", "No filter named 'center'"),
        ("{{ 'x' * 100000 }}", "above 10000"),
        ("{{ 9 ** 99999 }}", "above 10000"),
        ("{{ lipsum() }}", "'lipsum' is undefined"),
        ("{% for a in range(5000) %}{% endfor %}hi", "range() may yield at most"),
        (
            "{% for a in range(1) %}{% for b in range(1) %}{% for c in range(1) %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            "loops may nest at most 2 deep",
        ),
        ("{{ 'x' * 3000 }}", "longer than 2000"),
        (
            # A checked operator per step: the deadline is met within 50 ms of work,
            # however fast the machine runs the bare loop.
            "{% for a in range(1000) %}{% for b in range(1000) %}{% if a + b > 5000 %}x"
            "{% endif %}{% endfor %}{% endfor %}busy",
            "took longer than 50 ms",
        ),
        ("   {{ '' }}  ", "renders an empty message"),
        ("x" * 4001, "longer than 4000"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(body: str, needle: str) -> None:
    """Syntax, undefined names, unsafe access, refused tags and every limit: INVALID_TEMPLATE."""
    with pytest.raises(InvalidTemplateError) as caught:
        check_template(body, check_type="reminder", kinds=kinds_of("any"))
    assert caught.value.field == "body"
    assert caught.value.code == "INVALID_TEMPLATE"
    assert needle in caught.value.message


def test_a_good_template_sees_every_variable() -> None:
    """The block's fields, the live item, metadata and the user's local time are there."""
    body = (
        "{{ time_of_day|capitalize }} ({{ weekday }} {{ local_clock }})! {{ item.label }}: "
        "{{ item.properties.dosage }}, {{ metadata.campaign }}, {{ check_type }}/{{ source }}"
    )
    template = check_template(body, check_type="medication", kinds=kinds_of("schedule"))
    block = _schedule("medication", MEDICATION_INTENT, IBUPROFEN)
    assert (
        template.render(block)
        == "Morning (Saturday 09:00)! Ibuprofen: 500mg, v2, medication/schedule"
    )


# --- through the dispatcher --------------------------------------------------------------


def processor(engine: AsyncEngine, books: TemplateBooks) -> Processor:
    messages = Messages(books)
    return Processor(
        engine, TemplateComposer(), Subjects("tt"), ManualClock(NOW), messages=messages
    )


async def test_project_template_writes_the_message(engine: AsyncEngine) -> None:
    """A fire of a check type with a project template gets that template's message."""
    await rows.project(engine)
    await rows.item(engine)
    await rows.schedule(engine, inventory_item_id="inv_1", check_type="medication")
    store = TemplateStore(engine)
    await store.create_template(
        "proj_1",
        check_type="medication",
        source="any",
        body="Hey! {{ item.label }} time ({{ item.properties.dosage }}) at {{ local_clock }}.",
        now=NOW,
    )
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    result = await processor(engine, TemplateBooks(store, ttl_s=5)).process(
        [SourceRef(SourceKind.SCHEDULE, fid)]
    )

    assert result.created == [notification_id(fid)]
    [note] = await rows.notifications(engine)
    assert note["generated_message"] == "Hey! Daily Vitamin D time (1000 IU) at 09:00."
    assert (note["status"], note["composer"]) == ("pending", "template")
    assert json.loads(note["payload_json"])["generated_message"] == note["generated_message"]


async def test_without_a_template_the_default_writes_the_message(engine: AsyncEngine) -> None:
    """No project template: the built-in default, marked ``default``."""
    await rows.project(engine)
    await rows.wakeup(engine, occasion="Sarah's 30th birthday")

    await processor(engine, TemplateBooks(TemplateStore(engine), ttl_s=5)).process(
        [SourceRef(SourceKind.WAKEUP, "wk_1")]
    )

    [note] = await rows.notifications(engine)
    assert note["generated_message"] == "Hi! Just a reminder: it's Sarah's 30th birthday."
    assert note["composer"] == "default"


async def test_a_stored_template_failing_at_fire_time_falls_back_to_the_default(
    engine: AsyncEngine,
) -> None:
    """
    A template that needs an item property the live item lacks: the fire still gets a
    message, the built-in default's, marked ``default_fallback``; it is still published.
    """
    await rows.project(engine)
    await rows.schedule(engine, check_type="medication", intent=MEDICATION_INTENT)
    store = TemplateStore(engine)
    await store.create_template(
        "proj_1",
        check_type="medication",
        source="schedule",
        body="Take {{ item.properties.colour }} pills",
        now=NOW,
    )
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    result = await processor(engine, TemplateBooks(store, ttl_s=5)).process(
        [SourceRef(SourceKind.SCHEDULE, fid)]
    )

    [note] = await rows.notifications(engine)
    assert note["generated_message"] == (
        "Hi! Just a reminder: time to take your ibuprofen at the correct dose."
    )
    assert (note["status"], note["composer"]) == ("pending", "default_fallback")
    assert result.fallbacks == [note["id"]]
    assert len(await rows.outbox(engine)) == 1


async def test_templates_are_read_once_per_ttl(engine: AsyncEngine) -> None:
    """Batches within the TTL reuse a project's templates; after it an update is seen."""
    await rows.project(engine)
    store = TemplateStore(engine)
    row = await store.create_template(
        "proj_1", check_type="birthday", source="wakeup", body="v1 {{ occasion }}", now=NOW
    )
    assert row is not None
    seconds = [0.0]
    books = TemplateBooks(store, ttl_s=5, clock=lambda: seconds[0])
    proc = processor(engine, books)
    for n in range(3):
        await rows.wakeup(engine, f"wk_{n}", occasion="the party")
        await proc.process([SourceRef(SourceKind.WAKEUP, f"wk_{n}")])
    await store.update_template("proj_1", row["id"], body="v2 {{ occasion }}", now=NOW)
    await rows.wakeup(engine, "wk_cached", occasion="the party")
    await proc.process([SourceRef(SourceKind.WAKEUP, "wk_cached")])
    seconds[0] = 5.0
    await rows.wakeup(engine, "wk_fresh", occasion="the party")
    await proc.process([SourceRef(SourceKind.WAKEUP, "wk_fresh")])

    messages = {n["wakeup_id"]: n["generated_message"] for n in await rows.notifications(engine)}
    assert messages["wk_cached"] == "v1 the party"
    assert messages["wk_fresh"] == "v2 the party"
    assert books.reads == 2


@pytest.fixture
async def js(nats_url: str, subject_prefix: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context with this test's stream; deleted after."""
    nc = await nats.connect(nats_url)
    context = nc.jetstream()
    await ensure_stream(context, Subjects(subject_prefix))
    try:
        yield context
    finally:
        await context.delete_stream(Subjects(subject_prefix).stream)
        await nc.close()


async def test_the_dispatcher_uses_project_templates_for_real_fires(
    engine: AsyncEngine, js: JetStreamContext, nats_url: str, subject_prefix: str
) -> None:
    """
    Through JetStream and the default-settings dispatcher: the project's template for a
    fire, the built-in default for a wakeup, each marked as such.
    """
    await rows.project(engine)
    await rows.schedule(engine, check_type="check_in")
    await rows.wakeup(engine)
    await TemplateStore(engine).create_template(
        "proj_1",
        check_type="check_in",
        source="schedule",
        body="Good {{ time_of_day }}! How are you feeling today?",
        now=NOW,
    )
    fid = await rows.fire(engine, "sch_1", FIRE_AT)
    subjects = Subjects(subject_prefix)
    fire = FireCreated(fire_id=fid, schedule_id="sch_1", fire_at=FIRE_AT).model_dump_json()
    await js.publish(subjects.fire_created, fire.encode(), headers={"Nats-Msg-Id": fid})
    wakeup = WakeupDue(wakeup_id="wk_1", fire_at=FIRE_AT).model_dump_json()
    await js.publish(subjects.wakeup_due, wakeup.encode(), headers={"Nats-Msg-Id": "wk_1"})

    dispatcher = Dispatcher(
        Settings(subject_prefix=subject_prefix), engine, nats_url=nats_url, clock=ManualClock(NOW)
    )
    try:
        result = await dispatcher.drain(idle_s=0.2)
    finally:
        await dispatcher.stop()

    assert sorted(result.created) == sorted([notification_id(fid), notification_id("wk_1")])
    notes = {n["source_id"]: n for n in await rows.notifications(engine)}
    assert notes[fid]["generated_message"] == "Good morning! How are you feeling today?"
    assert notes[fid]["composer"] == "template"
    assert notes["wk_1"]["generated_message"] == "Happy birthday! Wishing you a wonderful day."
    assert notes["wk_1"]["composer"] == "default"


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-05T23:59:59.999999Z",
        "2026-12-05T11:33:49.5",
        "2026-12-06T00:00:00.000001+08:00",
        "2026-12-05T11:33:49.Z",
        "2026-12-05T11:33:49.12x",
        "2026-12-05T11:33:49",
        "not an instant at all, much longer than twenty",
    ],
)
def test_local_parts_are_those_of_the_whole_text(text: str) -> None:
    """The local parts of an instant, with or without a fraction, are those of its whole text."""
    assert _local(text) == _local_of.__wrapped__(text)


def test_instants_within_one_second_share_one_memo_entry() -> None:
    """Events a burst accepts within one second are rendered from one memo entry."""
    _local("2026-12-05T10:11:12.000001Z")
    before = _local_of.cache_info()

    for micros in range(2, 12):
        _local(f"2026-12-05T10:11:12.{micros:06d}Z")

    after = _local_of.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (10, 0)
