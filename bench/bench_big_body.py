"""
Oversized request bodies against one ``delivery run``: the daemon's RSS before, at its
peak during, and after three concurrent 200 MB ``POST .../wakeups`` bodies (one long
``intent``) sent with a valid key and an ``Idempotency-Key``, once with
``Content-Length`` and once chunked, and the answer each request got.

    .venv/bin/python bench/bench_big_body.py              # 3 x 200 MB, each framing
    .venv/bin/python bench/bench_big_body.py --mb 20      # smaller bodies
    .venv/bin/python bench/bench_big_body.py --slow 200   # then 200 slow-body connections

The daemon is the embedded default (SQLite and its own nats-server in a temporary
folder, a free port, ``DELIVERY_BOOTSTRAP_API_KEY``), started as
``python -m delivery run`` from this checkout (``PYTHONPATH`` is set to it, so the
script measures the tree it sits in). RSS is the daemon process alone (psutil, sampled
every 20 ms; the nats-server child is not counted). Clients are raw asyncio sockets that
stream the body from one reused 1 MiB buffer while reading the answer, so a server that
answers early and closes is seen as such ("answered after N MB sent").
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
API_KEY = "dk_bench_big_body_0123456789abcdef"
PATH = "/api/v1/agents/bench_agent/wakeups"
PREFIX = b'{"user_id":"u1","check_type":"reminder","delay_hours":1,"intent":"'
SUFFIX = b'"}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sampler:
    """RSS of one process every ``interval_s`` in a thread; keeps the maximum."""

    def __init__(self, proc: psutil.Process, interval_s: float = 0.02) -> None:
        self.proc = proc
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / MB)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Outcome:
    status: str
    sent_mb: float
    seconds: float


async def big_post(port: int, size: int, *, chunked: bool) -> Outcome:
    """Stream one ``size``-byte wakeup body; stop sending once the server has answered."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    writer.write(
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {API_KEY}\r\nIdempotency-Key: {uuid.uuid4().hex}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n"
        ).encode()
    )
    sent = 0
    answer: asyncio.Task[bytes] = asyncio.create_task(reader.readline())

    def frame(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

    filler = b"x" * MB
    try:
        pieces = [PREFIX]
        remaining = size - len(PREFIX) - len(SUFFIX)
        while remaining > 0 or pieces:
            if answer.done():
                break
            if not pieces:
                take = min(remaining, MB)
                remaining -= take
                pieces.append(filler if take == MB else filler[:take])
                if remaining == 0:
                    pieces.append(SUFFIX)
            data = pieces.pop(0)
            writer.write(frame(data))
            await writer.drain()
            sent += len(data)
        if chunked and not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        line = await asyncio.wait_for(answer, 600)
        status = line.decode(errors="replace").split(" ")[1] if line else "closed, no answer"
    except (ConnectionResetError, BrokenPipeError):
        status = "reset, no answer"
    except IndexError:
        status = "malformed answer"
    finally:
        writer.close()
    return Outcome(status, sent / MB, time.perf_counter() - started)


async def wait_up(base_url: str, popen: subprocess.Popen[bytes]) -> None:
    """Until ``/health`` answers, then one small idempotent POST (warms the code paths)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon's API did not come up")
            await asyncio.sleep(0.2)
        warm = await client.post(
            PATH,
            content=PREFIX + b"warm up" + SUFFIX,
            headers={"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": uuid.uuid4().hex},
        )
        warm.raise_for_status()


async def probe(port: int, proc: psutil.Process, size: int, *, chunked: bool) -> None:
    await asyncio.sleep(1.0)
    before = proc.memory_info().rss / MB
    with Sampler(proc) as sampler:
        outcomes = await asyncio.gather(*(big_post(port, size, chunked=chunked) for _ in range(3)))
        await asyncio.sleep(1.0)
    after = proc.memory_info().rss / MB
    label = "chunked" if chunked else "Content-Length"
    print(f"3 x {size / MB:.0f} MB, {label}:")
    print(
        f"  daemon RSS before {before:.0f} MB, peak {max(sampler.peak, after):.0f} MB, "
        f"after {after:.0f} MB"
    )
    for n, out in enumerate(outcomes, 1):
        print(f"  request {n}: {out.status} after {out.sent_mb:.1f} MB sent, {out.seconds:.2f} s")


async def slow_body(port: int, stop: asyncio.Event) -> float | None:
    """One body byte a second, never finished; seconds until the server closed, or None."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
    )
    closed = asyncio.create_task(reader.read())  # returns at EOF: the server closed
    try:
        while not stop.is_set():
            writer.write(b" ")
            await writer.drain()
            done, _ = await asyncio.wait([closed], timeout=1.0)
            if done:
                return time.perf_counter() - started
    except (ConnectionResetError, BrokenPipeError):
        return time.perf_counter() - started
    finally:
        closed.cancel()
        writer.close()
    return None


async def slow_probe(port: int, count: int, limit_s: float) -> None:
    stop = asyncio.Event()
    clients = [asyncio.create_task(slow_body(port, stop)) for _ in range(count)]
    await asyncio.sleep(limit_s)
    stop.set()
    closed = [s for s in await asyncio.gather(*clients) if s is not None]
    latest = f", the last after {max(closed):.1f} s" if closed else ""
    print(
        f"{count} slow-body connections (1 byte/s): {count - len(closed)} still open after "
        f"{limit_s:.0f} s; {len(closed)} closed by the server{latest}"
    )


async def run(port: int, popen: subprocess.Popen[bytes], size: int, slow: int) -> None:
    proc = psutil.Process(popen.pid)
    await wait_up(f"http://127.0.0.1:{port}", popen)
    print(f"delivery run from {ROOT} on port {port}")
    await probe(port, proc, size, chunked=False)
    await probe(port, proc, size, chunked=True)
    if slow:
        await slow_probe(port, slow, 40.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=200, help="body size in MiB (default 200)")
    parser.add_argument(
        "--slow", type=int, default=0, help="then N slow-body connections, watched for 40 s"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_big_body_") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
        env.update(
            PYTHONPATH=str(ROOT),
            DELIVERY_DATA_DIR=str(Path(tmp) / "data"),
            DELIVERY_PORT=str(port),
            DELIVERY_BOOTSTRAP_API_KEY=API_KEY,
            DELIVERY_LOG_LEVEL="WARNING",
            DELIVERY_LOG_JSON="true",
        )
        log = Path(tmp) / "daemon.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "delivery", "run"],
                env=env,
                cwd=tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            asyncio.run(run(port, popen, args.mb * MB, args.slow))
            if popen.poll() is not None:
                print(f"the daemon exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
        finally:
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()


if __name__ == "__main__":
    main()
