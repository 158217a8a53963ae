"""The LLM composer against a real local OpenAI-compatible server (uvicorn in a thread)."""

from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.compose import schedule_block
from delivery.dispatcher.composers import (
    SYSTEM_PROMPT,
    CompositionError,
    LlmComposer,
    TemplateComposer,
    build_composer,
)
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.settings import Settings
from tests.dispatcher import rows
from tests.dispatcher.openai_standin import StandIn
from tests.fixtures.http import ServeApp

BLOCK = schedule_block(
    intent="check in on how the user is feeling",
    check_type="reminder",
    fire_at_local="2026-05-02T09:00:00+08:00",
    item=None,
    metadata={"campaign": "daily_checkin_v2"},
)


@pytest.fixture
def standin(http_server: ServeApp) -> tuple[StandIn, str]:
    """The stand-in server and its base URL (``.../v1``)."""
    server = StandIn()
    return server, http_server(server.app()) + "/v1"


async def test_llm_composer_sends_the_block_and_returns_the_message(
    standin: tuple[StandIn, str],
) -> None:
    """The request carries model, system prompt and the intent block; the reply is trimmed."""
    server, base_url = standin
    composer = LlmComposer(base_url=base_url, model="tiny", api_key="sk-test", timeout_s=5)
    try:
        message = await composer.compose(BLOCK)
    finally:
        await composer.aclose()

    assert message == "Hey! (check in on how the user is feeling)"
    [request] = server.requests
    assert request["model"] == "tiny"
    assert request["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": BLOCK.text},
    ]


@pytest.mark.parametrize(
    ("mode", "needle"),
    [("error", "HTTP 500"), ("slow", "timed out"), ("empty", "no message content")],
)
async def test_llm_composer_failures_raise(
    standin: tuple[StandIn, str], mode: str, needle: str
) -> None:
    """A 5xx, a timeout or a reply without text raises CompositionError naming the cause."""
    server, base_url = standin
    server.mode = mode
    composer = LlmComposer(base_url=base_url, model="tiny", api_key="sk-test", timeout_s=0.5)
    try:
        with pytest.raises(CompositionError, match=needle):
            await composer.compose(BLOCK)
    finally:
        await composer.aclose()


async def test_llm_failure_keeps_failed_generation(
    engine: AsyncEngine, standin: tuple[StandIn, str]
) -> None:
    """Through the dispatcher core, an LLM failure keeps the notification with its error."""
    server, base_url = standin
    server.mode = "error"
    await rows.project(engine)
    await rows.wakeup(engine)
    settings = Settings(
        composer="llm", llm_base_url=base_url, llm_model="tiny", llm_api_key="sk-test"
    )
    composer = build_composer(settings)
    try:
        proc = Processor(engine, composer, Subjects("t"), ManualClock(datetime.now(UTC)))
        result = await proc.process([SourceRef(SourceKind.WAKEUP, "wk_1")])
    finally:
        await composer.aclose()

    [note] = await rows.notifications(engine)
    assert result.failed == [note["id"]]
    assert note["status"] == "failed_generation"
    assert "HTTP 500" in note["error"]


def test_build_composer_choices() -> None:
    """The template composer is the default; llm needs a base URL; anything else is refused."""
    assert isinstance(build_composer(Settings()), TemplateComposer)
    with pytest.raises(ValueError, match="LLM_BASE_URL"):
        build_composer(Settings(composer="llm"))
    with pytest.raises(ValueError, match="unknown composer"):
        build_composer(Settings(composer="poetry"))
