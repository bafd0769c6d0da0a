"""The `install-service` group, its one error policy, and how commands reach the database.

Every command that touches data opens one transaction (`run`), hands its session to the same
service functions the HTTP API calls, and commits at the end. A user's mistake (a bad
argument, document or database URL, an unreachable database, an unknown name, a conflict)
is reported like the API reports it, never as a traceback; anything else is a bug and keeps
its traceback.

Importing the command line costs click and the command definitions, nothing more: `--help`
and a mistyped argument answer at once. A command imports the domain it works on (and with
it SQLAlchemy, the database driver, the log pipeline) when it runs, inside its function.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from install_service.cli import output
from install_service.errors import InstallServiceError, Invalid, Unavailable, in_words

if TYPE_CHECKING:
    import msgspec
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncSession

    from install_service.actor import Actor

T = TypeVar("T")


class UsageMistake(InstallServiceError):
    """A command line click could not accept (unknown option, missing argument, ...)."""

    code = "invalid_usage"
    status = 400
    title = "Bad request"


class BadRequest(InstallServiceError):
    """Arguments that the API would refuse with a 400 (a bad slug, email, ...)."""

    code = "invalid_request"
    status = 400
    title = "Bad request"


S = TypeVar("S", bound="msgspec.Struct")


def request(body: type[S], **fields: Any) -> S:
    """The API's request body built from command-line arguments, validated the same way."""
    import msgspec

    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, body)
    except msgspec.ValidationError as exc:
        raise BadRequest(in_words(str(exc))) from None


class _JsonLogsOnFirstLine(logging.Handler):
    """Stands in for the JSON log pipeline until a first line is logged: only then is the
    pipeline (structlog and its imports) set up and the line handed to it. Most commands log
    nothing at all."""

    def emit(self, record: logging.LogRecord) -> None:
        from install_service import logs

        logs.configure(self.level)  # replaces this handler
        logging.getLogger().handle(record)


_logging_configured = False


def configure_logging(level: int = logging.WARNING) -> None:
    """Send this process's log lines through the JSON pipeline, from `level` up. The first
    call decides (`serve` and `worker` ask for INFO before anything else runs); commands
    get warnings only, and pay for the pipeline only if they have one to say."""
    global _logging_configured
    if _logging_configured:
        return
    _logging_configured = True
    if level >= logging.WARNING:
        root = logging.getLogger()
        root.handlers = [_JsonLogsOnFirstLine(level)]
        root.setLevel(level)
        logging.captureWarnings(True)
        return
    from install_service import logs

    logs.configure(level)


def database_url() -> URL:
    """INSTALL_SERVICE_DATABASE_URL, or the embedded PostgreSQL (started or joined)."""
    from sqlalchemy import exc as sa_exc

    from install_service.config import Settings
    from install_service.db.engine import async_url, start_embedded

    configure_logging()
    settings = Settings.from_env()
    if settings.database_url:
        try:
            return async_url(settings.database_url)
        except (ValueError, sa_exc.ArgumentError):
            # The message would repeat the URL, password included.
            raise Invalid(
                "INSTALL_SERVICE_DATABASE_URL is not a PostgreSQL URL; expected "
                "postgresql://user:password@host:port/database",
                code="invalid_database_url",
            ) from None
    logging.getLogger("install_service.cli").info(
        "embedded PostgreSQL", extra={"data_dir": str(settings.data_dir)}
    )
    try:
        return start_embedded(settings.data_dir)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(
            f"could not start the embedded PostgreSQL in {settings.data_dir}: {exc}",
            code="embedded_database_failed",
        ) from exc


def run(work: Callable[[AsyncSession], Awaitable[T]], *, url: URL | None = None) -> T:
    """Run `work` in one transaction, committed when it returns."""
    from install_service.db.engine import create_engine
    from install_service.db.session import transaction

    configure_logging()
    database = url or database_url()

    async def main() -> T:
        engine = create_engine(database, pool_size=2)
        try:
            async with transaction(engine) as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def actor_for(session: AsyncSession, email: str | None) -> Actor:
    """Who a command acts as: the user with `email` (`--as`), else the operator."""
    from install_service.orgs.service import actor_for_email

    return await actor_for_email(session, email)


# SQLSTATE classes of "could not use the database at all": connection exceptions, invalid
# authorization, unknown database, and a server shutting down or starting up.
_UNREACHABLE_SQLSTATES = ("08", "28", "3D", "57P")


def unreachable(exc: BaseException) -> Unavailable | None:
    """The database could not be reached or signed in to: an `Unavailable` saying why."""
    # Connecting failed (asyncpg raises OS errors; the job queue's psycopg pool its own).
    # Imported here: only a failing command gets this far.
    import psycopg
    import psycopg_pool

    failed_to_connect = (OSError, TimeoutError, psycopg.OperationalError, psycopg_pool.PoolTimeout)
    seen: BaseException | None = exc
    while seen is not None:
        sqlstate = getattr(seen, "sqlstate", None) or getattr(
            getattr(seen, "orig", None), "sqlstate", None
        )
        if isinstance(seen, failed_to_connect) or (
            isinstance(sqlstate, str) and sqlstate.startswith(_UNREACHABLE_SQLSTATES)
        ):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Unavailable(f"the database is unreachable: {reason}")
        seen = seen.__cause__ or seen.__context__
    return None


class Commands(click.Group):
    """The command group: one place decides how failures look (see the module docstring)."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        output.reset()
        try:
            result = super().main(argv, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # Ctrl-C, or SIGTERM (see `main`)
            raise SystemExit(130) from None
        except click.ClickException as exc:
            if "--json" in argv:
                output.fail(UsageMistake(exc.format_message()), exit_code=exc.exit_code)
            exc.show()
            raise SystemExit(exc.exit_code) from None
        except InstallServiceError as exc:
            output.fail(exc)
        except Exception as exc:
            reason = unreachable(exc)
            if reason is None:
                raise
            output.fail(reason)
        raise SystemExit(result if isinstance(result, int) else 0)


def _stop_like_ctrl_c(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Install curated schema templates into organizations and keep them in sync.

    The database is INSTALL_SERVICE_DATABASE_URL, or an embedded PostgreSQL kept under
    INSTALL_SERVICE_DATA_DIR (default: the user data directory). Add --json to any command
    for one JSON document on stdout: its result, or a problem object with the API's `code`.
    """
    # SIGTERM stops a command the way Ctrl-C does, so its clean-up runs (the embedded
    # PostgreSQL stops with the last process using it) and nothing is printed.
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
