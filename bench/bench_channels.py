"""
Notifications per second fanned out to one contact of each kind (FCM, email, SMS).

The real channels (``handlers.fcm``, ``handlers.email``, ``handlers.sms``) and the real
``ChannelRouter`` send to the local stand-ins (FCM + OAuth2 and Twilio under uvicorn,
SMTP under aiosmtpd), which run in a separate process so they do not share our event
loop or GIL. Each notification is one ``fan_out`` to three contacts; ``--concurrency``
fan-outs are in flight at once. Every attempt must come back ``sent`` and the stand-ins
must report no protocol problems, or the run fails.

    .venv/bin/python bench/bench_channels.py            # 2000 notifications, 8 in flight
    .venv/bin/python bench/bench_channels.py --quick    # smoke run, a few seconds
    .venv/bin/python bench/bench_channels.py --client httpx --concurrency 16

``--client aiohttp`` (the default) is the daemon's ``provider_http_client``; ``httpx``
is httpx's own pool, for comparison. Email opens one SMTP connection per message (see
``handlers.email``), which is what bounds the figure.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from delivery.clock import SystemClock  # noqa: E402 - after the sys.path fix-up
from delivery.logs import configure_logging  # noqa: E402
from handlers.base import Channel, Message  # noqa: E402
from handlers.contacts import Contact, ContactKind  # noqa: E402
from handlers.email import SmtpChannel, SmtpSecurity  # noqa: E402
from handlers.fanout import AttemptStatus, ChannelRouter, provider_http_client  # noqa: E402
from handlers.fcm import FcmChannel, ServiceAccount  # noqa: E402
from handlers.sms import SmsChannel  # noqa: E402

PROJECT = "bench-project"
CLIENT_EMAIL = "bench@bench-project.iam.gserviceaccount.com"
KEY_ID = "bench-key"
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-token"  # noqa: S105 - the stand-in's throwaway token
CONTACTS = [
    Contact(ContactKind.FCM, "bench-device:APA91b" + "x" * 140),
    Contact(ContactKind.EMAIL, "bench@example.com"),
    Contact(ContactKind.SMS, "+14155550100"),
]


def _message(n: int) -> Message:
    return Message(
        event_id=f"evt_bench_{n:08d}",
        event_type="delivery.notification.created",
        project_id="default",
        agent_id="agent-bench",
        user_id="user-bench",
        message_id=f"msg_bench_{n:08d}",
        check_type="daily_checkin",
        intent="check in",
        generated_message="Good morning! A quick check-in: how are you feeling today?",
        created_at=datetime.now(UTC),
    )


async def _run(args: argparse.Namespace, http_url: str, smtp_port: int, key_pem: str) -> None:
    clock = SystemClock()
    # "aiohttp" is what the daemon uses (provider_http_client); "httpx" shows why: its
    # own pool spends most of its CPU re-checking idle connections (encode/httpx#3215).
    if args.client == "aiohttp":
        client = provider_http_client()
    else:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        client = httpx.AsyncClient(timeout=30, limits=limits)
    async with client:
        account = ServiceAccount(PROJECT, CLIENT_EMAIL, key_pem, KEY_ID)
        channels: dict[ContactKind, Channel] = {
            ContactKind.FCM: FcmChannel(
                account,
                client=client,
                clock=clock,
                base_url=http_url,
                token_url=f"{http_url}/token",
            ),
            ContactKind.EMAIL: SmtpChannel(
                "127.0.0.1",
                smtp_port,
                "bench@mail.example.com",
                clock=clock,
                security=SmtpSecurity.PLAIN,
                timeout_s=30,
            ),
            ContactKind.SMS: SmsChannel(
                ACCOUNT_SID,
                AUTH_TOKEN,
                "+15005550006",
                client=client,
                clock=clock,
                base_url=http_url,
            ),
        }
        router = ChannelRouter(channels)
        # Warm-up: the first FCM send fetches the OAuth token; connections get opened.
        for attempt in await router.fan_out(_message(-1), CONTACTS):
            assert attempt.status is AttemptStatus.SENT, attempt

        latencies: list[float] = []
        per_kind: dict[ContactKind, list[float]] = {kind: [] for kind in ContactKind}
        failures: list[str] = []
        counter = iter(range(args.notifications))

        async def worker() -> None:
            for n in counter:
                started = time.perf_counter()
                attempts = await router.fan_out(_message(n), CONTACTS)
                latencies.append(time.perf_counter() - started)
                for a in attempts:
                    per_kind[a.kind].append(a.duration.total_seconds())
                failures.extend(
                    f"{a.kind}: {a.reason}" for a in attempts if a.status is not AttemptStatus.SENT
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started

    if failures:
        raise SystemExit(f"{len(failures)} attempts failed, e.g. {failures[:3]}")
    rate = args.notifications / elapsed
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"channels fan-out: {rate:,.0f} notifications/s ({rate * 3:,.0f} sends/s: FCM + SMTP + "
        f"SMS) over {args.notifications} notifications, concurrency {args.concurrency}, "
        f"{args.client} client, "
        f"{elapsed:.2f} s; fan-out latency p50 {quantiles[49] * 1000:.1f} ms, "
        f"p95 {quantiles[94] * 1000:.1f} ms"
    )
    print(
        "per-channel send p50: "
        + ", ".join(
            f"{kind.value} {statistics.median(values) * 1000:.1f} ms"
            for kind, values in per_kind.items()
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 notifications")
    parser.add_argument("--notifications", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--client",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="HTTP transport under the httpx client FCM and SMS share",
    )
    args = parser.parse_args()
    configure_logging("WARNING")  # failures still show, on stderr; figures go to stdout
    if args.quick:
        args.notifications, args.concurrency = 60, 8

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with tempfile.TemporaryDirectory() as folder:
        public_key = Path(folder) / "public.pem"
        public_key.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        standins = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.handlers.channels.standins",
                "--public-key",
                str(public_key),
                "--client-email",
                CLIENT_EMAIL,
                "--project-id",
                PROJECT,
                "--key-id",
                KEY_ID,
                "--account-sid",
                ACCOUNT_SID,
                "--auth-token",
                AUTH_TOKEN,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert standins.stdin is not None
        assert standins.stdout is not None
        try:
            addresses = json.loads(standins.stdout.readline())
            asyncio.run(_run(args, addresses["http"], addresses["smtp_port"], key_pem))
        finally:
            standins.stdin.close()  # asks the stand-ins to stop and report
            report_line = standins.stdout.readline()
            standins.wait(timeout=30)
            standins.stdout.close()
    report = json.loads(report_line)
    expected = args.notifications + 1
    print(
        f"stand-ins saw: {report['fcm_sends']} FCM sends ({report['fcm_exchanges']} token "
        f"exchange), {report['emails']} emails, {report['sms_sends']} SMS; "
        f"problems: {len(report['problems'])}"
    )
    if report["problems"] or not (
        report["fcm_sends"] == report["emails"] == report["sms_sends"] == expected
    ):
        raise SystemExit(f"stand-ins disagree: {report}")


if __name__ == "__main__":
    main()
