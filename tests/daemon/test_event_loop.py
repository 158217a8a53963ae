"""The long-running commands' loop: uvloop where it is installed, as they are run."""

import asyncio

import pytest
import uvloop

from delivery import startup


def test_a_command_runs_on_uvloop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    startup.run_main(main, debug=False)
    assert isinstance(seen[0], uvloop.Loop)


def test_without_uvloop_a_command_runs_on_asyncios_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where uvloop is not built (its import failed), asyncio's own loop serves."""
    monkeypatch.setattr(startup, "_LOOP_FACTORY", None)
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    startup.run_main(main, debug=False)
    assert not isinstance(seen[0], uvloop.Loop)
    assert isinstance(seen[0], asyncio.BaseEventLoop)
