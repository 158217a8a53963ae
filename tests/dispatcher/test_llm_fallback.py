"""
The LLM composer through the dispatcher's message step, against a real local
OpenAI-compatible server: a flaky provider is retried, a dead one is replaced by
the project's template, and no notification is ever left without its message.
"""

from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import LlmComposer
from delivery.dispatcher.messages import Messages, TemplateBooks
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef, notification_id
from delivery.store.tables import WakeupRow
from delivery.store.templates import TemplateStore
from tests.dispatcher import rows
from tests.dispatcher.openai_standin import StandIn
from tests.fixtures.http import ServeApp

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)


@pytest.fixture
def standin(http_server: ServeApp) -> tuple[StandIn, str]:
    """The stand-in server and its base URL (``.../v1``)."""
    server = StandIn()
    return server, http_server(server.app()) + "/v1"


async def _process(
    engine: AsyncEngine, base_url: str, ref: SourceRef, *, retry_s: float
) -> tuple[Processor, list[str]]:
    llm = LlmComposer(base_url=base_url, model="tiny", api_key="sk-test", timeout_s=2)
    books = TemplateBooks(TemplateStore(engine), ttl_s=5)
    messages = Messages(books, llm, retry_s=retry_s, backoff_s=0.05)
    proc = Processor(engine, llm, Subjects("tl"), ManualClock(NOW), messages=messages)
    try:
        result = await proc.process([ref])
    finally:
        await llm.aclose()
    return proc, result.fallbacks


async def test_a_flaky_llm_is_retried_until_it_answers(
    engine: AsyncEngine, standin: tuple[StandIn, str]
) -> None:
    """Two 500s, then an answer: three requests, the LLM's message, marked ``llm``."""
    server, base_url = standin
    server.fail_first = 2
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    _, fallbacks = await _process(engine, base_url, SourceRef(SourceKind.SCHEDULE, fid), retry_s=10)

    assert len(server.requests) == 3
    [note] = await rows.notifications(engine)
    assert note["generated_message"] == "Hey! (check in on how the user is feeling)"
    assert (note["status"], note["composer"], note["error"]) == ("pending", "llm", None)
    assert fallbacks == []
    assert len(await rows.outbox(engine)) == 1


async def test_a_dead_llm_falls_back_to_the_project_template(
    engine: AsyncEngine, standin: tuple[StandIn, str]
) -> None:
    """
    Every request fails for the whole retry budget: the project's template writes
    the message, the notification is pending and published, marked ``template_fallback``.
    """
    server, base_url = standin
    server.mode = "error"
    await rows.project(engine)
    await rows.wakeup(engine, occasion="Sarah's 30th birthday")
    await TemplateStore(engine).create_template(
        "proj_1",
        check_type="birthday",
        source="wakeup",
        body="Don't forget: {{ occasion }}!",
        now=NOW,
    )

    started = datetime.now(UTC)
    _, fallbacks = await _process(
        engine, base_url, SourceRef(SourceKind.WAKEUP, "wk_1"), retry_s=1.0
    )
    elapsed = (datetime.now(UTC) - started).total_seconds()

    assert len(server.requests) >= 2, "retried at least once"
    assert elapsed < 5, "bounded by the retry budget"
    [note] = await rows.notifications(engine)
    assert note["generated_message"] == "Don't forget: Sarah's 30th birthday!"
    assert (note["status"], note["composer"], note["error"]) == (
        "pending",
        "template_fallback",
        None,
    )
    assert fallbacks == [notification_id("wk_1")]
    assert (await rows.row(engine, WakeupRow, "wk_1"))["status"] == "executed"
    assert [o["msg_id"] for o in await rows.outbox(engine)] == [notification_id("wk_1")]


async def test_a_dead_llm_without_a_template_falls_back_to_the_default(
    engine: AsyncEngine, standin: tuple[StandIn, str]
) -> None:
    """No project template: the built-in default, still a message, still ``template_fallback``."""
    server, base_url = standin
    server.mode = "empty"
    await rows.project(engine)
    await rows.event(engine)

    await _process(engine, base_url, SourceRef(SourceKind.EVENT, "evt_1"), retry_s=0.3)

    [note] = await rows.notifications(engine)
    assert note["generated_message"] == (
        "Congratulations! You just reached level 25 — a major milestone in the game."
    )
    assert (note["status"], note["composer"]) == ("pending", "template_fallback")
