"""
Notifications per second through the channels worker, one contact of each kind.

Unlike ``bench_channels.py`` (the router alone), this is the worker's whole path per
JetStream batch: read the notifications, contacts (opening their sealed destinations)
and preferences (``ChannelStore.fanout_inputs``), fan out to FCM, SMTP and SMS
concurrently, and record every attempt in one transaction. The provider stand-ins
(``tests.handlers.channels.standins``) run in their own process; the database is SQLite
in a temporary folder. Batches of ``--batch`` (the consumer's pull size) run one after
another, as one pull subscriber does.

    .venv/bin/python bench/bench_channels_worker.py            # 1920 notifications
    .venv/bin/python bench/bench_channels_worker.py --quick    # 192, a few seconds

Target: >= 1,000 notifications/s. It also prints the worker process's CPU per
notification, the steadier figure on a shared machine.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from delivery.clock import SystemClock  # noqa: E402 - after the sys.path fix-up
from delivery.logs import configure_logging  # noqa: E402
from delivery.secrets import SecretBox  # noqa: E402
from delivery.settings import Settings  # noqa: E402
from delivery.store.bulk import insert_notifications  # noqa: E402
from delivery.store.channels import ChannelStore  # noqa: E402
from delivery.store.engine import create_engine  # noqa: E402
from delivery.store.migrate import migrate  # noqa: E402
from delivery.store.sql import SqlStore  # noqa: E402
from handlers.channels_worker import BATCH, ChannelsWorker, FanoutResult  # noqa: E402

FCM_PROJECT = "bench-project"
CLIENT_EMAIL = "bench@bench-project.iam.gserviceaccount.com"
KEY_ID = "bench-key"
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-token"  # noqa: S105 - the stand-in's throwaway token
AGENT, USER = "agent-bench", "user-bench"
TARGET_RATE = 1000.0
"""Notifications per second, each to FCM, SMTP and SMS, every attempt recorded."""


def _rows(project: str, count: int) -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "id": f"msg_bench_{n:08d}",
            "project_id": project,
            "agent_id": AGENT,
            "user_id": USER,
            "source_type": "event",
            "source_id": f"evt_bench_{n:08d}",
            "schedule_id": None,
            "wakeup_id": None,
            "trigger_event_id": f"evt_bench_{n:08d}",
            "event_type": "on_trigger_event",
            "check_type": "daily_checkin",
            "intent": "check in",
            "generated_message": "Good morning! A quick check-in: how are you feeling today?",
            "status": "pending",
            "error": None,
            "fire_at": now,
            "payload_json": json.dumps({"event_id": f"evt_bench_{n:08d}"}),
            "ack_status": "pending",
            "acknowledged_at": None,
            "created_at": now,
            "consumed_at": None,
        }
        for n in range(-1, count)
    ]


async def _run(args: argparse.Namespace, settings: Settings, folder: Path) -> None:
    url = f"sqlite+aiosqlite:///{folder / 'delivery.db'}"
    await migrate(url)
    engine = create_engine(url)
    clock = SystemClock()
    worker = ChannelsWorker(settings, engine, clock=clock, batch=args.batch)
    try:
        project = (await SqlStore(engine).keys.ensure_project("bench", clock.now())).id
        # Destinations are sealed with the deployment's key, which the worker opens them with.
        contacts = ChannelStore(engine, secrets=SecretBox.from_settings(settings))
        for kind, destination in [
            ("fcm", "bench-device:APA91b" + "x" * 140),
            ("email", "bench@example.com"),
            ("sms", "+14155550100"),
        ]:
            await contacts.add_contact(
                project,
                AGENT,
                USER,
                kind=kind,
                destination=destination,
                opted_out=False,
                now=clock.now(),
            )
        rows = _rows(project, args.notifications)
        async with engine.begin() as conn:
            await insert_notifications(conn, rows)
        ids = [str(r["id"]) for r in rows]
        # Warm-up: the FCM OAuth token is fetched, connections are opened.
        warm = await worker.fan_out(ids[:1])
        if warm.sent != 3:
            raise SystemExit(f"warm-up did not send to all three contacts: {warm}")

        total = FanoutResult()
        started = time.perf_counter()
        cpu_started = time.process_time()
        for i in range(1, len(ids), args.batch):
            total.add(await worker.fan_out(ids[i : i + args.batch]))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await worker.stop()
        await engine.dispose()

    if total.failed or total.sent != 3 * args.notifications:
        raise SystemExit(f"not every attempt was sent: {total}")
    rate = args.notifications / elapsed
    print(
        f"channels worker: {rate:,.0f} notifications/s ({rate * 3:,.0f} sends/s: FCM + SMTP + "
        f"SMS, every attempt recorded) over {args.notifications} notifications in batches of "
        f"{args.batch}, {elapsed:.2f} s, SQLite; target {TARGET_RATE:,.0f}/s, "
        f"ratio {rate / TARGET_RATE:.2f}"
    )
    # The worker's own CPU (the stand-ins run in another process): steadier than the
    # rate when other work shares the cores.
    print(
        f"worker process CPU: {1000 * cpu / args.notifications:.3f} ms per notification "
        f"(one free core would do {args.notifications / cpu:,.0f}/s)"
    )
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    """Start the stand-ins, run, print the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 192 notifications")
    parser.add_argument("--notifications", type=int, default=1920)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    configure_logging("WARNING")
    if args.quick:
        args.notifications = 192

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        public_key = folder / "public.pem"
        public_key.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        account_file = folder / "service-account.json"
        account_file.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": FCM_PROJECT,
                    "private_key_id": KEY_ID,
                    "private_key": key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                    "client_email": CLIENT_EMAIL,
                    "token_uri": "https://oauth2.googleapis.com/token",
                }
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
                FCM_PROJECT,
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
            http = addresses["http"]
            settings = Settings(
                data_dir=folder,
                # Contacts are sealed with this key (a deployment's DELIVERY_SECRET_KEY).
                secret_key=f"bench-{os.urandom(16).hex()}",
                subject_prefix="bench",
                fcm_service_account_file=account_file,
                fcm_base_url=http,
                fcm_token_url=f"{http}/token",
                smtp_host="127.0.0.1",
                smtp_port=addresses["smtp_port"],
                smtp_security="plain",
                smtp_from="bench@mail.example.com",
                sms_base_url=http,
                sms_account_sid=ACCOUNT_SID,
                sms_auth_token=AUTH_TOKEN,
                sms_from="+15005550006",
            )
            asyncio.run(_run(args, settings, folder))
        finally:
            standins.stdin.close()
            standins.wait(10)


if __name__ == "__main__":
    main()
