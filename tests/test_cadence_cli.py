"""`delivery cadence preview`: next fires in UTC and local time, or the error code and message."""

import json
import subprocess
import sys


def _preview(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", "cadence", "preview", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_preview_prints_fires_in_utc_and_local_time() -> None:
    """A valid schedule prints one line per fire: the UTC instant, then the local one."""
    body = {
        "cadence": {
            "simple": {"frequency": "daily", "times": ["09:00"]},
            "timezone": "Asia/Singapore",
        },
        "active_window": {"days_of_week": ["mon", "tue", "wed", "thu", "fri"]},
        "starts_at": "2026-05-01T00:00:00Z",
        "ends_at": "2026-05-14T23:59:59Z",
    }
    out = _preview(json.dumps(body), "--after", "2026-04-20T00:00:00Z", "-n", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "2026-05-01T01:00:00Z  2026-05-01T09:00:00+08:00",
        "2026-05-04T01:00:00Z  2026-05-04T09:00:00+08:00",
        "2026-05-05T01:00:00Z  2026-05-05T09:00:00+08:00",
    ]


def test_preview_skips_dst_gap() -> None:
    """The preview shows the engine's DST rule: New York's 02:30 is skipped on 2026-03-08."""
    body = {"cadence": {"cron": "30 2 * * *", "timezone": "America/New_York"}}
    out = _preview(json.dumps(body), "--after", "2026-03-07T00:00:00-05:00", "-n", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "2026-03-07T07:30:00Z  2026-03-07T02:30:00-05:00",
        "2026-03-09T06:30:00Z  2026-03-09T02:30:00-04:00",
    ]


def test_preview_defaults_after_to_now() -> None:
    """Without --after the preview starts from the system clock and prints -n lines."""
    body = {
        "cadence": {
            "simple": {"frequency": "interval_hours", "interval_hours": 1},
            "timezone": "UTC",
        }
    }
    out = _preview(json.dumps(body), "-n", "2")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2


def test_preview_invalid_schedule_prints_code_and_message() -> None:
    """An invalid schedule exits non-zero with the error code and a message naming the field."""
    body = {"cadence": {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "+08:00"}}
    out = _preview(json.dumps(body), "--after", "2026-05-01T00:00:00Z")
    assert out.returncode != 0
    assert out.stdout == ""
    assert "INVALID_TIMEZONE" in out.stderr
    assert "cadence.timezone" in out.stderr


def test_preview_naive_after_is_refused() -> None:
    """--after without an offset is INVALID_REQUEST naming --after."""
    body = {"cadence": {"cron": "0 9 * * *", "timezone": "UTC"}}
    out = _preview(json.dumps(body), "--after", "2026-05-01T00:00:00")
    assert out.returncode != 0
    assert "INVALID_REQUEST" in out.stderr
    assert "--after" in out.stderr


def test_preview_bad_json_is_refused() -> None:
    """Malformed JSON is INVALID_REQUEST, not a traceback."""
    out = _preview("{cadence:", "--after", "2026-05-01T00:00:00Z")
    assert out.returncode != 0
    assert "INVALID_REQUEST" in out.stderr
    assert "Traceback" not in out.stderr
