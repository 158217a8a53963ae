"""Every log line goes out through structlog: the standard library's and uvicorn's too."""

import json
import subprocess
import sys

SNIPPET = """
import logging, structlog
from delivery.logs import configure_logging
configure_logging("INFO", json=True)
structlog.contextvars.bind_contextvars(request_id="req-from-context")
structlog.get_logger("ours").info("structlog line", n=1)
logging.getLogger("some.library").warning("stdlib line %s", "formatted")
logging.getLogger("uvicorn.error").info("uvicorn line")
logging.getLogger("httpx").info("one line per request: kept quiet")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("some.library").exception("with a traceback")
"""


def test_stdlib_and_uvicorn_lines_are_structlog_json_with_the_context() -> None:
    """Each line is one JSON object with level, timestamp and the bound request id."""
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert set(by_event) == {
        "structlog line",
        "stdlib line formatted",
        "uvicorn line",
        "with a traceback",
    }
    for line in lines:
        assert line["request_id"] == "req-from-context"
        assert {"level", "timestamp"} <= set(line)
    assert by_event["stdlib line formatted"]["logger"] == "some.library"
    assert by_event["stdlib line formatted"]["level"] == "warning"
    assert by_event["uvicorn line"]["logger"] == "uvicorn.error"
    assert "ZeroDivisionError" in by_event["with a traceback"]["exception"]
