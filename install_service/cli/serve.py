"""`serve` and `worker`: the long-running processes. Everything they say is a JSON log line."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from install_service.cli.base import configure_logging, database_url, main, run
from install_service.config import JOBS_PER_RUN

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# Shipped inside the package, so an installed wheel seeds them as a checkout does.
BUNDLED_TEMPLATES = Path(str(files("install_service").joinpath("templates", "bundled")))


def freeze_startup() -> None:
    """Keep what a long-running process built to start (modules, the app, SQLAlchemy's
    metadata: some 120,000 objects) out of every later garbage collection. A full collection
    walks every object it tracks, about 50 ms here, and a request that makes many objects
    sets one off: a fleet dry run of 10,000 installs did once or twice, spending 65 to 130 ms
    of its 350 to 460 in collections, against 20 ms with this."""
    gc.collect()
    gc.freeze()


def _log() -> Any:
    from install_service import logs

    return logs.get_logger("install_service.serve")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--templates",
    "templates_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=BUNDLED_TEMPLATES,
    show_default="the bundled templates/",
    help="Seed every template document under this directory at start-up.",
)
def serve(host: str, port: int, templates_dir: Path) -> None:
    """Migrate, seed bundled templates, ensure an admin token, serve HTTP and run a worker.

    Several processes may start together on one database: they migrate and seed in turn.
    SIGTERM or Ctrl-C stops the server gracefully (and the embedded PostgreSQL with it, when
    no other process uses it).
    """
    configure_logging(logging.INFO)
    import uvicorn

    from install_service.app import create_app
    from install_service.config import Settings
    from install_service.db import migrate
    from install_service.orgs import service as orgs

    log = _log()
    settings = Settings.from_env()
    url = database_url()
    migrate.upgrade(url)
    log.info("migrations applied", revision=migrate.head_revision())
    seed(url, templates_dir)
    token = run(lambda s: orgs.ensure_admin(s, settings.admin_token), url=url)
    if token:
        log.warning(
            "platform admin token created (shown once; set INSTALL_SERVICE_ADMIN_TOKEN to "
            "choose your own)",
            token=token,
        )
    log.info("serving", url=f"http://{host}:{port}", docs=f"http://{host}:{port}/docs")
    app = create_app(url, settings=settings, worker=True)
    freeze_startup()
    # uvicorn shuts down gracefully on SIGTERM or Ctrl-C, then raises the signal again: that
    # is the end of serving, not an error. It sets up no logging of its own (`log_config`), so
    # its lines go through the JSON pipeline too. Long polls of the change feed (up to 30 s)
    # must not hold a shutdown up: they are cut after a few seconds.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=3,
        )
    log.info("stopped")


def seed(url: URL, templates_dir: Path) -> None:
    """Publish each bundled template unless someone published it since (see `templates.seed`),
    each after the templates it requires."""
    from functools import partial

    from install_service.templates import documents
    from install_service.templates import service as templates

    log = _log()
    for path, document in documents.load_directory(templates_dir):
        result = run(partial(templates.seed, document=document), url=url)
        if result.action == "kept":
            log.info(
                "bundled template not applied: its latest release was not published by seeding",
                template=result.template,
                version=result.version,
                source=result.source,
                path=str(path),
            )
        else:
            log.info(
                f"bundled template {result.action}",
                template=result.template,
                version=result.version,
            )


@main.command()
@click.option("--concurrency", default=JOBS_PER_RUN, show_default=True, type=int)
def worker(concurrency: int) -> None:
    """Run resync workers alone (no HTTP); start several, on several machines, to share runs.

    SIGTERM or Ctrl-C lets the jobs in progress finish, then stops."""
    configure_logging(logging.INFO)
    from install_service.db.engine import create_engine
    from install_service.resync import jobs

    log = _log()
    url = database_url()

    async def work() -> None:
        engine = create_engine(url, pool_size=concurrency + 1)
        try:
            async with jobs.opened(url) as queue:
                log.info("worker running", worker=jobs.worker_name(), concurrency=concurrency)
                await jobs.run_worker(engine, queue, concurrency=concurrency)
        finally:
            await engine.dispose()

    freeze_startup()
    asyncio.run(work())
    log.info("stopped")
