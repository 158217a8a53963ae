"""
Trigger-event storm: keep-alive clients post trigger events as fast as the service
answers, for a fixed time; how many were accepted per second, how long each took from
acceptance to a ``pending`` notification, and that each accepted event made exactly one.

The service is ``delivery run`` on the embedded default (SQLite + its own nats-server),
so the figure holds the whole pipeline on one machine: the API commits the event and its
outbox row, the relay publishes ``event.accepted``, the dispatcher composes the message
(the built-in template) and commits the notification, the handlers look for contacts.
Acceptance is the event row's ``created_at`` and pending the notification's, both
stamped by the service's clock, so the client's own delays are not counted in them.

    .venv/bin/python bench/bench_trigger_storm.py                 # 64 clients, 60 s
    .venv/bin/python bench/bench_trigger_storm.py --seconds 10    # a short run
    .venv/bin/python bench/bench_trigger_storm.py --tree ../old --tree . --rounds 2
    .venv/bin/python bench/bench_trigger_storm.py --seconds 30 --floor   # and the floor

The clients (aiohttp, one connection each) run in this process on the same two cores
as the service, so they take CPU the service would otherwise have; the accepted rate
is a floor on what the service alone does. Each event goes to one of 1,000 users.

``--floor`` first runs the same clients, with the same bodies and headers, against a
FastAPI hello-world POST (``bench_api_cost.py``'s: it validates the body and answers
JSON, nothing else) for as long: the rate this machine's two cores allow a Python
server that does no work, under the same load generator, and the ratio to it.
"""

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api_cost import Server, _wait_ready, free_port, start_floor

USERS = 1000
TARGET_RATE = 3000.0
TARGET_P99_S = 1.0


@dataclass
class Run:
    label: str
    accepted: int
    refused: int
    seconds: float
    p50_s: float
    p99_s: float
    max_s: float
    all_pending_after_s: float
    notifications: int
    distinct_sources: int
    missing: int
    cpu_s: float
    nats_cpu_s: float
    client_cpu_s: float
    load: str

    @property
    def cpu_ms_per_event(self) -> float:
        return self.cpu_s * 1000 / max(1, self.accepted)

    @property
    def all_cpu_ms_per_event(self) -> float:
        """Server, its nats-server and the load generator: every core-second of the run."""
        return (self.cpu_s + self.nats_cpu_s + self.client_cpu_s) * 1000 / max(1, self.accepted)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds


def start(tree: Path, tmp: Path) -> tuple[Server, Path]:
    python = tree / ".venv" / "bin" / "python"
    data_dir = tmp / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p),
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT=str(port),
        DELIVERY_LOG_JSON="true",
    )
    key = subprocess.run(
        [str(python), "-m", "delivery", "keys", "create", "--project", "bench"],
        env=env,
        cwd=tmp,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "delivery", "run"],
            env=env,
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, port, {"Authorization": f"Bearer {key}"})
    _wait_ready(server, "/ready", log)
    return server, next(data_dir.glob("*.db"))


EVENTS_PATH = "/api/v1/agents/storm-agent/events"


async def storm(
    server: Server, clients: int, seconds: float, path: str = EVENTS_PATH
) -> tuple[list[str], int, float]:
    """Post events from ``clients`` connections for ``seconds``; the accepted event ids."""
    accepted: list[str] = []
    refused = 0
    url = f"{server.base_url}{path}"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=server.headers) as session:
        stop_at = time.monotonic() + seconds

        async def client(c: int) -> None:
            nonlocal refused
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                body = {
                    "user_id": f"user-{(c * 7919 + n) % USERS}",
                    "event_type": "order_shipped",
                    "event_description": f"order {c}-{n} shipped",
                }
                # As the SDK does: every POST carries an Idempotency-Key.
                headers = {"Idempotency-Key": uuid.uuid4().hex}
                async with session.post(url, json=body, headers=headers) as resp:
                    if resp.status == 200:
                        accepted.append((await resp.json())["event_id"])
                    else:
                        refused += 1
                        await resp.read()

        started = time.monotonic()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.monotonic() - started
    return accepted, refused, elapsed


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def settle(db: Path, accepted: list[str], timeout_s: float) -> tuple[float, dict[str, float]]:
    """Wait until every accepted event has its notification; their latencies."""
    wanted = set(accepted)
    started = time.monotonic()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        while True:
            done = conn.execute(
                "SELECT count(*) FROM notifications WHERE source_type = 'event'"
            ).fetchone()[0]
            if done >= len(wanted) or time.monotonic() - started > timeout_s:
                break
            time.sleep(0.25)
        rows = conn.execute(
            "SELECT e.id, e.created_at, n.created_at FROM trigger_events e "
            "JOIN notifications n ON n.source_id = e.id"
        ).fetchall()
    latency = {
        event_id: (_instant(made) - _instant(taken)).total_seconds()
        for event_id, taken, made in rows
        if event_id in wanted
    }
    return time.monotonic() - started, latency


def measure(label: str, tree: Path, args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench_storm_") as tmp:
        server, db = start(tree, Path(tmp))
        try:
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            cpu_before, nats_before = server.cpu(), server.children_cpu()
            client_before = time.process_time()
            accepted, refused, elapsed = asyncio.run(storm(server, args.clients, args.seconds))
            client_cpu_s = time.process_time() - client_before
            waited, latency = settle(db, accepted, args.timeout)
            # The whole pipeline's work for the storm, settled: API, relay,
            # dispatcher and handlers; the embedded nats-server apart.
            cpu_s = server.cpu() - cpu_before
            nats_cpu_s = server.children_cpu() - nats_before
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                notifications, distinct = conn.execute(
                    "SELECT count(*), count(DISTINCT source_id) FROM notifications "
                    "WHERE source_type = 'event'"
                ).fetchone()
        finally:
            server.stop()
    values = sorted(latency.values()) or [float("nan")]
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    run = Run(
        label=label,
        accepted=len(accepted),
        refused=refused,
        seconds=elapsed,
        p50_s=statistics.median(values),
        p99_s=p99,
        max_s=values[-1],
        all_pending_after_s=waited,
        notifications=notifications,
        distinct_sources=distinct,
        missing=len(set(accepted) - set(latency)),
        cpu_s=cpu_s,
        nats_cpu_s=nats_cpu_s,
        client_cpu_s=client_cpu_s,
        load=load,
    )
    print(
        f"  {label}: {run.accepted:,} accepted in {run.seconds:.1f} s = {run.rate:,.0f}/s "
        f"({run.refused} refused); acceptance -> pending p50 {run.p50_s:.3f} s, "
        f"p99 {run.p99_s:.3f} s, max {run.max_s:.3f} s; all pending {waited:.1f} s after "
        f"the last post; notifications {notifications:,} for {distinct:,} events, "
        f"{run.missing} accepted without one; server CPU {run.cpu_ms_per_event:.2f} ms/event "
        f"(load average {load} at the start)",
        flush=True,
    )
    per_event = 1000 / max(1, run.accepted)
    print(
        f"    CPU per event: server {run.cpu_ms_per_event:.3f} ms, its nats-server "
        f"{run.nats_cpu_s * per_event:.3f} ms, load generator "
        f"{run.client_cpu_s * per_event:.3f} ms; {run.all_cpu_ms_per_event:.3f} ms in all, "
        f"so two cores allow at most {2000 / run.all_cpu_ms_per_event:,.0f} events/s at this cost",
        flush=True,
    )
    return run


def measure_floor(args: argparse.Namespace) -> float:
    """The same storm against the hello-world POST; its answered requests per second."""
    with tempfile.TemporaryDirectory(prefix="bench_storm_floor_") as tmp:
        server = start_floor(Path(tmp))
        try:
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            cpu_before, client_before = server.cpu(), time.process_time()
            answered, refused, elapsed = asyncio.run(
                storm(server, args.clients, args.seconds, path="/echo")
            )
            cpu_ms = (server.cpu() - cpu_before) * 1000 / max(1, len(answered))
            client_ms = (time.process_time() - client_before) * 1000 / max(1, len(answered))
        finally:
            server.stop()
    rate = len(answered) / elapsed
    print(
        f"  floor (hello-world POST): {len(answered):,} answered in {elapsed:.1f} s = "
        f"{rate:,.0f}/s ({refused} refused); server CPU {cpu_ms:.2f} ms/request, load "
        f"generator {client_ms:.3f} ms/request (load average {load} at the start)",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="wait for pending, s")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="a checkout with its own .venv (repeatable; default: this one); interleaved",
    )
    parser.add_argument(
        "--floor", action="store_true", help="also storm a FastAPI hello-world POST, each round"
    )
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = [t.resolve() for t in args.tree] if args.tree else [here]
    print(
        f"trigger storm: {args.clients} keep-alive clients, {args.seconds:.0f} s, "
        f"`delivery run` (SQLite + its nats-server)",
        flush=True,
    )
    runs: dict[str, list[Run]] = {}
    floors: list[float] = []
    for _ in range(args.rounds):
        if args.floor:
            floors.append(measure_floor(args))
        for tree in trees:
            label = tree.resolve().name
            runs.setdefault(label, []).append(measure(label, tree, args))
    print()
    print(
        f"{'tree':14} {'accepted/s':>11} {'p50 s':>8} {'p99 s':>8} {'CPU ms/event':>13} "
        f"{'exactly one':>12}"
    )
    for label, done in runs.items():
        rate = statistics.median(r.rate for r in done)
        p50 = statistics.median(r.p50_s for r in done)
        p99 = statistics.median(r.p99_s for r in done)
        exact = all(
            r.missing == 0 and r.notifications == r.distinct_sources == r.accepted for r in done
        )
        cpu = statistics.median(r.cpu_ms_per_event for r in done)
        print(f"{label:14} {rate:11,.0f} {p50:8.3f} {p99:8.3f} {cpu:13.2f} {exact!s:>12}")
    best = max(statistics.median(r.rate for r in done) for done in runs.values())
    print(
        f"\ntarget: >= {TARGET_RATE:,.0f} accepted/s with p99 <= {TARGET_P99_S:.0f} s; "
        f"best here {best:,.0f}/s = {best / TARGET_RATE:.2f}x the target"
    )
    if floors:
        floor = statistics.median(floors)
        print(
            f"floor: a hello-world POST under the same clients answered {floor:,.0f}/s "
            f"= {floor / TARGET_RATE:.2f}x the target; best here = {best / floor:.2f}x the floor"
        )


if __name__ == "__main__":
    main()
