"""
Server CPU per API request against a FastAPI hello-world floor, and requests/s at 64
concurrent clients.

For each request kind the service's process is sent N sequential requests over one
kept-alive httpx connection, and the process's CPU time (psutil ``cpu_times`` user +
system, the process alone: the embedded nats-server child is not counted) over those N
requests is divided by N. The kinds are the Sonzai routes a backend calls most:

- ``POST /api/v1/agents/{agent}/events`` (trigger event),
- ``POST /api/v1/agents/{agent}/wakeups`` (``delay_hours: 1``: nothing falls due),
- ``POST /api/v1/agents/{agent}/users/{user}/schedules`` (daily at 09:00 UTC),

each once without and once with a fresh ``Idempotency-Key`` (the SDK sends one on every
POST), and ``GET /api/v1/agents/{agent}/notifications?user_id=…``, the polling read, on
a queue of 10,000 pending notifications (one per agent and user, so each poll answers
one entry).

The floor is a FastAPI hello-world (``GET /hello``, and ``POST /echo`` with a pydantic
JSON body) served by uvicorn with the service's options (httptools, uvloop, no access
log, no websockets), measured the same way in the same run.

The service runs as ``delivery web`` by default: the API alone, so the figure is each
request's own work. ``--command run`` serves the same API from ``delivery run`` (the
scheduler, relay, dispatcher and handlers in the same process, with its own
nats-server), so the figure also holds the wake of the scheduler after each write and
the pipeline's work on each trigger event (its notification and webhook fan-out):
what a one-process deployment pays per request.

Each service runs on a temporary SQLite file; its key comes from
``delivery keys create --project bench`` as the README says. ``--tree`` (repeatable)
measures other checkouts side by side, each with its own ``.venv`` and ``PYTHONPATH``,
interleaved over ``--rounds`` (old, new, old, new):

    .venv/bin/python bench/bench_api_cost.py                   # this tree, delivery web
    .venv/bin/python bench/bench_api_cost.py --quick           # smoke: 100 per kind
    .venv/bin/python bench/bench_api_cost.py --command run
    .venv/bin/python bench/bench_api_cost.py --tree ../apicost-old --tree . --rounds 2

The load generator runs in this process on the same machine: the sequential figures are
CPU the server spent, whatever the client costs; the concurrent requests/s are bounded
by the two sharing the cores (aiohttp, as in ``bench_notifications.py``).
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil  # type: ignore[import-untyped]

from delivery.store.bulk import insert_notifications
from delivery.store.engine import create_engine

ROOT = Path(__file__).resolve().parent.parent
AGENTS = 10
USERS = 1000
START = datetime(2026, 5, 1, tzinfo=UTC)
CADENCE = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}

HELLO_APP = textwrap.dedent(
    """
    import sys

    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    app = FastAPI()


    class Item(BaseModel):
        user_id: str
        event_type: str
        event_description: str


    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}


    @app.post("/echo")
    async def echo(item: Item) -> dict[str, object]:
        return {"accepted": True, "event_id": item.user_id}


    # The options delivery.api.serving.server_config gives uvicorn (httptools and
    # uvloop are uvicorn's automatic picks when installed, as for the service).
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False, ws="none"
    )
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Request:
    """One request of a kind: method, path, JSON body, extra headers."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Kind = Callable[[int], Request]


def _event(i: int) -> Request:
    body = {"user_id": f"u{i % USERS}", "event_type": "bench", "event_description": "bench event"}
    return Request("POST", "/api/v1/agents/agent-bench/events", body)


def _wakeup(i: int) -> Request:
    body = {"user_id": f"u{i % USERS}", "check_type": "check_in", "intent": "hi", "delay_hours": 1}
    return Request("POST", "/api/v1/agents/agent-bench/wakeups", body)


def _schedule(i: int) -> Request:
    body = {"cadence": CADENCE, "intent": "check in", "check_type": "reminder"}
    return Request("POST", f"/api/v1/agents/agent-bench/users/u{i % USERS}/schedules", body)


def _keyed(kind: Kind) -> Kind:
    def make(i: int) -> Request:
        req = kind(i)
        return Request(req.method, req.path, req.body, {"Idempotency-Key": uuid.uuid4().hex})

    return make


def _poll(i: int) -> Request:
    agent, user = f"agent-{i % AGENTS}", f"user-{(i * 7919) % USERS}"
    return Request("GET", f"/api/v1/agents/{agent}/notifications?user_id={user}")


KINDS: dict[str, Kind] = {
    "POST event": _event,
    "POST event +key": _keyed(_event),
    "POST wakeup": _wakeup,
    "POST wakeup +key": _keyed(_wakeup),
    "POST schedule": _schedule,
    "POST schedule +key": _keyed(_schedule),
    "GET queue": _poll,
}
FLOOR_KINDS: dict[str, Kind] = {
    "GET": lambda i: Request("GET", "/hello"),
    "POST": lambda i: Request(
        "POST", "/echo", {"user_id": f"u{i}", "event_type": "bench", "event_description": "d"}
    ),
}
CONCURRENT = ("POST event", "GET queue")
FLOOR_OF = {name: "GET" if name.startswith("GET") else "POST" for name in KINDS}


@dataclass
class Server:
    """A server process (service or floor) and where it answers."""

    proc: subprocess.Popen[bytes]
    port: int
    headers: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def children_cpu(self) -> float:
        """CPU seconds of the server's child processes so far (``delivery run``'s nats-server)."""
        total = 0.0
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_ready(server: Server, path: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=server.base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}; see {log}")
            try:
                if client.get(path).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server did not come up; see {log}")


async def _seed(url: str) -> None:
    """One pending notification per (agent, user): what a poll answers."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            project = (
                await conn.exec_driver_sql("SELECT id FROM projects WHERE name = 'bench'")
            ).scalar_one()
        rows = []
        for n in range(AGENTS * USERS):
            created = START + timedelta(milliseconds=n)
            rows.append(
                {
                    "id": f"msg_{n:08d}",
                    "project_id": project,
                    "agent_id": f"agent-{n % AGENTS}",
                    "user_id": f"user-{n // AGENTS}",
                    "source_type": "schedule",
                    "source_id": f"fire_{n:08d}",
                    "schedule_id": f"sch_{n % 1000}",
                    "wakeup_id": None,
                    "trigger_event_id": None,
                    "event_type": "on_recurring_event_due",
                    "check_type": "reminder",
                    "intent": "check in on how the user is feeling",
                    "generated_message": f"Good morning! How are you feeling today? ({n})",
                    "status": "pending",
                    "error": None,
                    "fire_at": created,
                    "payload_json": json.dumps({"message_id": f"msg_{n:08d}"}),
                    "ack_status": "pending",
                    "acknowledged_at": None,
                    "created_at": created,
                    "consumed_at": None,
                }
            )
        async with engine.begin() as conn:
            await insert_notifications(conn, rows)
    finally:
        await engine.dispose()


def start_service(tree: Path, command: str, tmp: Path) -> Server:
    """``delivery keys create``, seed the queue, then ``delivery <command>`` from ``tree``."""
    python = tree / ".venv" / "bin" / "python"
    data_dir = tmp / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        # The tree first; a caller's own PYTHONPATH after it (a sitecustomize, say).
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
    db = next(data_dir.glob("*.db"))
    asyncio.run(_seed(f"sqlite+aiosqlite:///{db}"))
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "delivery", command],
            env=env,
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, port, {"Authorization": f"Bearer {key}"})
    _wait_ready(server, "/health", log)
    return server


def start_floor(tmp: Path) -> Server:
    port = free_port()
    log = tmp / "floor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", HELLO_APP, str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(proc, port, {})
    _wait_ready(server, "/hello", log)
    return server


def sequential(
    server: Server, kind: Kind, n: int, warmup: int, profile: "Profiler | None" = None
) -> tuple[float, float]:
    """
    (server CPU ms per request, wall ms per request) over ``n`` requests in a row,
    under ``profile`` when given.
    """
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:

        def send(i: int) -> None:
            req = kind(i)
            r = client.request(req.method, req.path, json=req.body, headers=req.headers)
            if r.status_code >= 300:
                raise RuntimeError(f"{req.method} {req.path}: {r.status_code} {r.text[:300]}")

        for i in range(warmup):
            send(i)
        time.sleep(0.3)  # let the work the warm-up woke settle
        if profile is not None:
            profile.start(server.proc.pid)
        cpu0, wall0 = server.cpu(), time.perf_counter()
        for i in range(warmup, warmup + n):
            send(i)
        cpu1, wall1 = server.cpu(), time.perf_counter()
        if profile is not None:
            profile.stop()
    return (cpu1 - cpu0) * 1000 / n, (wall1 - wall0) * 1000 / n


class Profiler:
    """
    ``py-spy record --format raw`` around one sequential run, then the top frames.

    Self is the share of samples whose innermost frame is the function; cumulative the
    share whose stack holds it anywhere. Frames are named ``function (file)``, lines
    dropped, so one function's samples add up wherever they were taken in it.
    """

    def __init__(self, py_spy: str, out: Path, name: str, rate: int, top: int) -> None:
        self.py_spy = py_spy
        self.out = out / (name.replace(" ", "_").replace("+", "") + ".txt")
        self.rate = rate
        self.top = top
        self.name = name
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                str(self.rate),
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(60)
        self.summarise()

    def summarise(self) -> None:
        own: dict[str, int] = {}
        cumulative: dict[str, int] = {}
        total = 0
        idle = 0
        for line in self.out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
            if _IDLE.search(frames[-1]):
                idle += count
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                cumulative[frame] = cumulative.get(frame, 0) + count
        print(f"  profile {self.name}: {total} busy samples ({idle} idle left out) in {self.out}")
        for title, table in (("self", own), ("cumulative", cumulative)):
            print(f"    top {self.top} by {title} (share of busy samples):")
            ranked = [(f, c) for f, c in table.items() if not _PLUMBING.search(f)]
            for frame, count in sorted(ranked, key=lambda kv: -kv[1])[: self.top]:
                print(f"      {100 * count / max(total, 1):5.1f}%  {_short(frame)}")


_IDLE = re.compile(
    r"^(EpollSelector\.select \(|_connection_worker_thread \(.*aiosqlite/core\.py|"
    r"_worker \(.*concurrent/futures/thread\.py|(Condition|Event)\.wait \(.*threading\.py)"
)
"""
Innermost frames that are a thread waiting, not working: the event loop's ``epoll``,
aiosqlite's and the thread pool's queue ``get``. py-spy's own idle detection did not
drop them here, and they would otherwise be half of every profile.
"""
_PLUMBING = re.compile(
    r"typer/|click/|runpy|delivery/__main__|delivery/cli\.py|commands/api\.py|"
    r"asyncio/runners\.py|run_until_complete|run_forever|Thread\._bootstrap|Thread\.run "
)
"""Frames under every sample of a thread (the CLI, the loop's start): left out of the tops."""


def _short(frame: str) -> str:
    """``function (…/site-packages/pkg/mod.py)`` -> ``function (pkg/mod.py)``."""
    return (
        re.sub(r"\((?:[^()]*/)?(site-packages|delivery|bench)/", r"(\1/", frame)
        .replace("(site-packages/", "(")
        .replace("/usr/local/lib/python3.12/", "")
        .replace("/usr/lib/python3.12/", "")
    )


async def _concurrent(server: Server, kind: Kind, clients: int, seconds: float) -> tuple[int, int]:
    """(requests answered 2xx, others) by ``clients`` keep-alive clients in ``seconds``."""
    ok = bad = 0
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        base_url=server.base_url, headers=server.headers, connector=connector
    ) as session:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal ok, bad
            while time.perf_counter() < deadline:
                req = kind(next(counter))
                async with session.request(
                    req.method, req.path, json=req.body, headers=req.headers
                ) as r:
                    await r.read()
                    if r.status < 300:
                        ok += 1
                    else:
                        bad += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return ok, bad


def concurrent(
    server: Server, kind: Kind, clients: int, seconds: float
) -> tuple[float, float, int]:
    """(requests/s, server CPU ms per request, non-2xx answers) at ``clients`` in flight."""
    cpu0, wall0 = server.cpu(), time.perf_counter()
    ok, bad = asyncio.run(_concurrent(server, kind, clients, seconds))
    cpu1, wall1 = server.cpu(), time.perf_counter()
    return ok / (wall1 - wall0), (cpu1 - cpu0) * 1000 / max(ok + bad, 1), bad


@dataclass
class Figures:
    """Per label (a tree, or ``floor``): kind -> samples, one per round."""

    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    wall: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rate: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    load_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(
        self, table: dict[str, dict[str, list[float]]], label: str, kind: str, v: float
    ) -> None:
        table.setdefault(label, {}).setdefault(kind, []).append(v)


def _med(values: list[float] | None) -> float:
    return statistics.median(values) if values else float("nan")


def measure_floor(figures: Figures, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-api-floor-") as tmp:
        server = start_floor(Path(tmp))
        try:
            for name, kind in FLOOR_KINDS.items():
                cpu, wall = sequential(server, kind, args.n, args.warmup)
                figures.add(figures.cpu, "floor", name, cpu)
                figures.add(figures.wall, "floor", name, wall)
                print(f"  floor {name:<20} {cpu:7.3f} ms CPU  {wall:7.3f} ms wall", flush=True)
            for name in ("GET", "POST") if args.seconds else ():
                rate, load_cpu, _ = concurrent(
                    server, FLOOR_KINDS[name], args.clients, args.seconds
                )
                figures.add(figures.rate, "floor", name, rate)
                figures.add(figures.load_cpu, "floor", name, load_cpu)
                print(f"  floor {name:<20} {rate:7.0f} req/s at {args.clients} clients", flush=True)
        finally:
            server.stop()


def measure_tree(figures: Figures, label: str, tree: Path, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-api-cost-") as tmp:
        server = start_service(tree, args.command, Path(tmp))
        try:
            for name, kind in KINDS.items():
                if args.kind and name not in args.kind:
                    continue
                profile = None
                if args.profile is not None:
                    profile = Profiler(args.py_spy, args.profile / label, name, args.rate, args.top)
                cpu, wall = sequential(server, kind, args.n, args.warmup, profile)
                figures.add(figures.cpu, label, name, cpu)
                figures.add(figures.wall, label, name, wall)
                print(f"  {label} {name:<20} {cpu:7.3f} ms CPU  {wall:7.3f} ms wall", flush=True)
            for name in CONCURRENT:
                if (args.kind and name not in args.kind) or not args.seconds:
                    continue
                rate, load_cpu, bad = concurrent(server, KINDS[name], args.clients, args.seconds)
                figures.add(figures.rate, label, name, rate)
                figures.add(figures.load_cpu, label, name, load_cpu)
                print(
                    f"  {label} {name:<20} {rate:7.0f} req/s at {args.clients} clients "
                    f"({load_cpu:.3f} ms CPU/request, {bad} not 2xx)",
                    flush=True,
                )
        finally:
            server.stop()


def report(figures: Figures, labels: list[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"server CPU ms per request, {args.n} sequential requests per kind, "
        f"median of {args.rounds} round(s); `delivery {args.command}` on SQLite"
    )
    head = f"{'kind':<20} {'floor':>7}"
    for label in labels:
        head += f" {label:>12} {'x floor':>8}"
    print(head)
    for name in KINDS:
        if args.kind and name not in args.kind:
            continue
        floor = _med(figures.cpu.get("floor", {}).get(FLOOR_OF[name]))
        line = f"{name:<20} {floor:7.3f}"
        for label in labels:
            value = _med(figures.cpu.get(label, {}).get(name))
            line += f" {value:12.3f} {value / floor:8.1f}"
        print(line)
    print()
    print(f"requests/s with {args.clients} concurrent keep-alive clients, {args.seconds:g} s each")
    head = f"{'kind':<20} {'floor':>7}"
    for label in labels:
        head += f" {label:>12} {'ms CPU/req':>10}"
    print(head)
    for name in CONCURRENT:
        if args.kind and name not in args.kind:
            continue
        floor = _med(figures.rate.get("floor", {}).get(FLOOR_OF[name]))
        line = f"{name:<20} {floor:7.0f}"
        for label in labels:
            rate = _med(figures.rate.get(label, {}).get(name))
            load_cpu = _med(figures.load_cpu.get(label, {}).get(name))
            line += f" {rate:12.0f} {load_cpu:10.3f}"
        print(line)


def _labels(trees: list[Path]) -> Iterator[tuple[str, Path]]:
    for tree in trees:
        yield tree.name or str(tree), tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="sequential requests per kind")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrent run")
    parser.add_argument("--command", choices=("web", "run"), default="web")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="a checkout with its own .venv to measure (repeatable; default: this one)",
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=list(KINDS),
        help="measure only this kind (repeatable; default: all)",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the hello-world floor")
    parser.add_argument("--quick", action="store_true", help="smoke: 100 per kind, 2 s")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record each kind's sequential run with py-spy into this folder and print the "
        "top frames (the CPU figures then include py-spy's sampling)",
    )
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="frames printed per profile")
    args = parser.parse_args()
    if args.quick:
        args.n, args.warmup, args.seconds = 100, 20, 2.0
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    labels = list(_labels(trees))
    figures = Figures()
    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no}", flush=True)
        if not args.no_floor:
            measure_floor(figures, args)
        for label, tree in labels:
            measure_tree(figures, label, tree, args)
    report(figures, [label for label, _ in labels], args)


if __name__ == "__main__":
    main()
