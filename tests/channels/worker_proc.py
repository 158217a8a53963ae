"""
A handlers process for the channel fallback crash test: the channels worker's retry
loop alone (no NATS), on the database and settings named by ``DELIVERY_*``
variables, until SIGTERM or SIGKILL.

    python -m tests.channels.worker_proc <lease seconds>

Prints ``ready`` once the loop runs.
"""

import asyncio
import signal
import sys
from datetime import timedelta

from delivery.clock import SystemClock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from handlers.channels_worker import ChannelsWorker


async def main(lease_s: float) -> None:
    settings = Settings()
    engine = create_engine(settings.resolved_database_url())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = ChannelsWorker(
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
    asyncio.run(main(float(sys.argv[1])))
