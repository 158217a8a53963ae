"""With PROMETHEUS_MULTIPROC_DIR, /metrics merges what every worker process counted."""

import os
import subprocess
import sys
from pathlib import Path

COUNT = """
from delivery import metrics
metrics.OUTBOX_MESSAGES.labels("published").inc(3)
metrics.HttpMetrics().requests.labels("GET", "/health", "200").inc()
"""
RENDER = """
import sys
from delivery import metrics
sys.stdout.write(metrics.exposition().decode())
"""


def _run(code: str, directory: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_counters_of_several_processes_are_summed(tmp_path: Path) -> None:
    """Two worker processes count; a third one's exposition shows the sums."""
    _run(COUNT, tmp_path)
    _run(COUNT, tmp_path)
    text = _run(RENDER, tmp_path)
    assert 'delivery_outbox_messages_total{result="published"} 6.0' in text
    assert 'delivery_http_requests_total{method="GET",route="/health",status="200"} 2.0' in text
