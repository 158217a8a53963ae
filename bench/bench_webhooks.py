"""
Signed webhook deliveries per second, p50 / p99 latency, at 16 / 64 / 256 in flight.

Compares ``WebhookChannel`` (httpx over the httpx-aiohttp transport, SSRF resolver, signing,
attempt records) with a plain ``httpx.AsyncClient()`` sending the same signed body, in the
same run. The receiver is a minimal aiohttp server in a separate process, so it does not
share the sender's event loop or CPU time slice.

    .venv/bin/python bench/bench_webhooks.py            # 5 s per measurement
    .venv/bin/python bench/bench_webhooks.py --quick    # a few seconds in total

Target: >= 2,000 deliveries/s at 256 in flight with p99 < 250 ms, >= 5x plain httpx.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from delivery.clock import SystemClock
from delivery.logs import configure_logging
from handlers.base import Delivered, Message
from handlers.ssrf import parse_allow_nets
from handlers.webhooks.sender import WebhookChannel, WebhookEndpoint, encode_body
from handlers.webhooks.signing import generate_secret, sign

TARGET_RATE = 2000.0
TARGET_P99_MS = 250.0
TARGET_RATIO = 5.0


def serve_forever() -> None:
    """The receiver process: answer every POST with 200 as cheaply as aiohttp allows."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text='{"success":true}', content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def start_receiver() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"receiver did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line}/webhooks/sonzai"


def make_message() -> Message:
    created = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    payload = {
        "event_id": "evt_bench_0001",
        "event_type": "on_wakeup_ready",
        "created_at": created.isoformat(),
        "project_id": "proj_bench",
        "agent_id": "agent_bench",
        "user_id": "user_bench",
        "message_id": "msg_bench_0001",
        "source_type": "wakeup",
        "wakeup_id": "wk_bench",
        "check_type": "wakeup",
        "intent": "check in after the user's hiking trip",
        "generated_message": "Hey! How was the hike yesterday? Did you make it to the summit?",
        "fire_at": created.isoformat(),
        "fire_at_local": "2026-03-01T10:00:00+01:00",
        "metadata": {"occasion": "follow_up"},
    }
    return Message(
        event_id="evt_bench_0001",
        event_type="on_wakeup_ready",
        project_id="proj_bench",
        agent_id="agent_bench",
        user_id="user_bench",
        message_id="msg_bench_0001",
        check_type="wakeup",
        intent=str(payload["intent"]),
        generated_message=str(payload["generated_message"]),
        created_at=created,
        payload=payload,
    )


@dataclass
class Result:
    sender: str
    concurrency: int
    done: int
    errors: int
    elapsed: float
    latencies_ms: list[float]
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]


async def measure(
    name: str, send: Callable[[], Awaitable[bool]], concurrency: int, seconds: float
) -> Result:
    """Run ``concurrency`` workers for ``seconds`` (after a short warm-up)."""
    warm_deadline = time.perf_counter() + min(0.5, seconds / 4)

    async def warm() -> None:
        while time.perf_counter() < warm_deadline:
            await send()

    await asyncio.gather(*(warm() for _ in range(concurrency)))
    latencies: list[float] = []
    errors = 0
    done = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal errors, done
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            ok = await send()
            latencies.append((time.perf_counter() - t0) * 1000)
            if ok:
                done += 1
            else:
                errors += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    # A collapsing pool can leave requests hanging long after the deadline: bound the wait.
    _, pending = await asyncio.wait(tasks, timeout=seconds * 3 + 10)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - start
    return Result(
        name, concurrency, done, errors, elapsed, latencies, time.process_time() - cpu_start
    )


async def run(levels: list[int], seconds: float, url: str) -> list[tuple[Result, Result]]:
    secret = generate_secret()
    message = make_message()
    endpoint = WebhookEndpoint(url=url, secrets=(secret,))
    clock = SystemClock()
    rows: list[tuple[Result, Result]] = []
    for concurrency in levels:
        async with WebhookChannel(
            clock=clock,
            allow_nets=parse_allow_nets("127.0.0.0/8"),
            timeout=timedelta(seconds=15),
            max_in_flight=concurrency,
            per_endpoint=concurrency,  # one endpoint here: let it use every slot
        ) as channel:

            async def ours(channel: WebhookChannel = channel) -> bool:
                result = await channel.deliver(message, endpoint)
                return isinstance(result.outcome, Delivered)

            mine = await measure("WebhookChannel", ours, concurrency, seconds)

        async with httpx.AsyncClient(timeout=15) as client:

            async def plain(client: httpx.AsyncClient = client) -> bool:
                body = encode_body(message)
                headers = sign(body, msg_id=message.event_id, secrets=[secret], now=clock.now())
                headers["Content-Type"] = "application/json"
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError:
                    return False
                return response.is_success

            peer = await measure("plain httpx", plain, concurrency, seconds)
        rows.append((mine, peer))
    return rows


def report(rows: list[tuple[Result, Result]], seconds: float, loop: str) -> bool:
    print(
        f"signed webhook deliveries, {seconds:g} s per measurement, sender loop: {loop},"
        f" receiver: aiohttp in a separate process, {os.cpu_count()} CPUs,"
        f" Python {sys.version.split()[0]}"
    )
    header = (
        f"{'in flight':>9}  {'sender':<15} {'deliv/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'errors':>6} {'cpu us/deliv':>12}"
    )
    print(header)
    print("-" * len(header))
    verdict = True
    for mine, peer in rows:
        for r in (mine, peer):
            cpu_us = r.cpu_s / r.done * 1e6 if r.done else float("nan")
            print(
                f"{r.concurrency:>9}  {r.sender:<15} {r.rate:>9.0f} {r.pct(50):>8.1f}"
                f" {r.pct(99):>8.1f} {r.errors:>6} {cpu_us:>12.0f}"
            )
        ratio = mine.rate / peer.rate if peer.rate else float("inf")
        print(f"{'':>9}  ratio WebhookChannel / plain httpx: {ratio:.1f}x")
        if mine.concurrency == 256:
            verdict = (
                mine.rate >= TARGET_RATE
                and mine.pct(99) < TARGET_P99_MS
                and ratio >= TARGET_RATIO
                and mine.errors == 0
            )
    if any(m.concurrency == 256 for m, _ in rows):
        print(
            f"target at 256: >= {TARGET_RATE:.0f}/s, p99 < {TARGET_P99_MS:.0f} ms,"
            f" >= {TARGET_RATIO:.0f}x plain httpx: {'MET' if verdict else 'NOT MET'}"
        )
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~6 s)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--levels", default="16,64,256", help="comma-separated concurrencies")
    parser.add_argument(
        "--uvloop", action="store_true", help="run the senders on uvloop (both of them)"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_forever()
        return
    configure_logging("WARNING", json=True)  # per-attempt debug lines off, as in production
    seconds = args.seconds or (0.5 if args.quick else 5.0)
    levels = [int(x) for x in args.levels.split(",")]
    receiver, url = start_receiver()
    try:
        if args.uvloop:
            import uvloop

            rows = uvloop.run(run(levels, seconds, url))
        else:
            rows = asyncio.run(run(levels, seconds, url))
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    report(rows, seconds, "uvloop" if args.uvloop else "asyncio")


if __name__ == "__main__":
    main()
