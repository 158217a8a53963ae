"""
structlog set up once: JSON lines when stderr is not a TTY, a console renderer when it is.

Every line goes out in the one format: structlog's own lines straight from
structlog (its fast path), and the standard library's, uvicorn's and
every other library's through a root handler whose :class:`structlog.stdlib.ProcessorFormatter`
runs them through the same processors (context variables such as the request id
included) and the same renderer.
"""

import logging
import sys
from typing import Any

import structlog

from delivery.jsontext import JsonText

_configured = False

QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "aiosqlite": logging.WARNING,
    "asyncio": logging.WARNING,
    "nats": logging.WARNING,
    "faststream": logging.WARNING,
    "alembic": logging.WARNING,
}
"""Libraries that log a line per request or per message at INFO / DEBUG: kept quiet."""


def _log_default(value: object) -> Any:
    # What structlog's own renderer does with a value JSON has no form for.
    structlog_form = getattr(value, "__structlog__", None)
    return structlog_form() if callable(structlog_form) else repr(value)


_log_line = JsonText(separators=(", ", ": "), default=_log_default)
"""
The JSON renderer's encoder, built once: the same text as structlog's default
``json.dumps``, without an encoder built per line (2.5% of the service's CPU in a
trigger-event storm, one access line per request).
"""


def _render(event_dict: Any, **_options: Any) -> str:
    # structlog passes its ``json.dumps`` options; _log_line has them fixed.
    return _log_line(event_dict)


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """
    Configure structlog and bridge the stdlib root logger into it; safe to call more than once.

    Args:
        level: a stdlib level name.
        json: force JSON (True) or console (False); ``None`` picks JSON unless
            stderr is a terminal, which is what production log shippers want.
    """
    global _configured
    if _configured:
        return
    use_json = (not sys.stderr.isatty()) if json is None else json
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(_render) if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(numeric, quiet))
    # uvicorn's loggers propagate to the root (the API serves with log_config=None);
    # its own handlers, if a caller configured some, would print a second format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    _configured = True
