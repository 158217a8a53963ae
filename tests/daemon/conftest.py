"""Daemon fixtures: a JetStream context with this test's stream, and a project row."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from tests.daemon.helpers import add_project


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    subjects: Subjects

    async def stream_messages(self) -> int:
        info = await self.js.stream_info(self.subjects.stream)
        return int(info.state.messages)


@pytest.fixture
async def bus(nats_url: str, subject_prefix: str) -> AsyncIterator[Bus]:
    """A connection to the test NATS with this test's stream created (deleted afterwards)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subjects = Subjects(subject_prefix)
    await ensure_stream(js, subjects)
    try:
        yield Bus(nc, js, subjects)
    finally:
        await js.delete_stream(subjects.stream)
        await nc.close()


@pytest.fixture
async def project(engine: AsyncEngine) -> str:
    """The project every test row belongs to."""
    await add_project(engine)
    return "prj_test"
