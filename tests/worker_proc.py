"""
A handlers process for the crash tests: one durable worker alone (no NATS), on the
database and settings named by ``DELIVERY_*`` variables, until SIGTERM or SIGKILL.

    python -m tests.worker_proc webhooks|channels <lease seconds>

``webhooks`` runs the webhook worker's sweep; ``channels`` the channels worker's retry
and fallback loop. Prints ``ready`` once the loop runs. :func:`start_worker` starts one
from a test and drains its output (a full pipe would block it).
"""

import asyncio
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

from delivery.clock import SystemClock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from handlers.channels_worker import ChannelsWorker
from handlers.webhooks.worker import WebhookWorker

WORKERS = {"webhooks": WebhookWorker, "channels": ChannelsWorker}


@dataclass
class WorkerProcess:
    """A running worker process and everything it printed so far."""

    proc: asyncio.subprocess.Process
    reader: asyncio.Task[None]
    output: list[bytes]

    def printed(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    async def stop(self, sig: signal.Signals) -> None:
        """Send ``sig`` and reap the process and its output."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), 30)
        await self.reader


async def start_worker(kind: str, lease_s: float, env: dict[str, str]) -> WorkerProcess:
    """Start ``kind``'s worker with ``env`` and wait until it says ``ready``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.worker_proc",
        kind,
        str(lease_s),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    ready = asyncio.Event()
    output: list[bytes] = []

    async def drain() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            output.append(line)
            if line == b"ready\n":
                ready.set()

    worker = WorkerProcess(proc, asyncio.create_task(drain()), output)
    try:
        await asyncio.wait_for(ready.wait(), 30)
    except BaseException:
        await worker.stop(signal.SIGKILL)
        raise AssertionError(worker.printed()) from None
    return worker


async def main(kind: str, lease_s: float) -> None:
    settings = Settings()
    engine = create_engine(settings.resolved_database_url())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = WORKERS[kind](
        settings,
        engine,
        clock=SystemClock(),
        lease=timedelta(seconds=lease_s),
        poll_interval=timedelta(seconds=0.05),
    )
    try:
        await worker.start()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await worker.stop()
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
