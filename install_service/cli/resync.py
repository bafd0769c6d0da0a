"""`resync` and `runs`: move every install of a template to a release in background workers,
follow a run, retry its failed items."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text
from sqlalchemy.engine import URL

from install_service.cli.base import database_url, main, request, run
from install_service.cli.output import emit, json_option, note, stdout, table, wants_json
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.service import Actor
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest, ResyncRun

wait_option = click.option(
    "--wait", is_flag=True, help="Follow the run with a progress bar until it ends."
)


def _run_view(run: Any) -> RenderableType:
    c = run.counts
    summary = Text(
        f"run {run.id}: {run.template} v{run.version} {run.status}: "
        f"{c.succeeded} succeeded, {c.conflict} conflict, {c.failed} failed, "
        f"{c.pending} pending of {c.total}"
    )
    if not run.items:
        return summary
    details = table(
        "items that did not succeed",
        [
            ("organization", lambda i: i.organization.slug),
            "status",
            "attempts",
            (
                "detail",
                lambda i: (
                    "; ".join(f"{x['kind']}:{x['slug']} {x['reason']}" for x in i.conflicts or [])
                    or i.error
                ),
            ),
        ],
        run.items,
    )
    return Group(summary, details)


def _defer(url: URL, run: ResyncRun) -> None:
    """Queue the run's jobs (it is committed): workers in `serve` or `worker` pick them up."""

    async def defer() -> None:
        async with jobs.opened(url) as queue:
            await jobs.defer_run(queue, run.id)

    if run.status in ("queued", "running"):
        asyncio.run(defer())


def _finish(url: URL, run: ResyncRun, wait: bool) -> None:
    if wait:
        run = follow(url, run.id)
    emit(run, view=_run_view)


@main.command("resync")
@click.argument("template")
@click.option("--version", type=int, help="Release to move to (default: latest).")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@wait_option
@json_option
def resync_command(template: str, version: int | None, force: bool, wait: bool) -> None:
    """Move every active install of TEMPLATE to a release, in background workers.

    Workers run inside `install-service serve`, or alone with `install-service worker`.
    While a run of TEMPLATE is in progress, this follows that run instead of starting one.
    """
    body = request(ResyncRequest, version=version, force=force)
    url = database_url()
    run_ = run(
        lambda s: resync.start_run(
            s, Actor.system(), template, version=body.version, force=body.force
        ),
        url=url,
    )
    _defer(url, run_)
    joined = "" if run_.created else " (already in progress; following it)"
    note(f"resync run {run_.id}: {template} -> release {run_.version}{joined}")
    _finish(url, run_, wait)


@main.group("runs")
def runs_group() -> None:
    """Resync runs: status and retries."""


@runs_group.command("show")
@click.argument("run_id", type=click.UUID)
@wait_option
@json_option
def runs_show(run_id: uuid.UUID, wait: bool) -> None:
    """A run's status, counts and every item that did not succeed."""
    url = database_url()
    _finish(url, run(lambda s: resync.get_run(s, run_id), url=url), wait)


@runs_group.command("retry")
@click.argument("run_id", type=click.UUID)
@wait_option
@json_option
def runs_retry(run_id: uuid.UUID, wait: bool) -> None:
    """Queue a finished run's conflicted and failed items again."""
    url = database_url()
    run_ = run(lambda s: resync.retry_run(s, run_id), url=url)
    _defer(url, run_)
    _finish(url, run_, wait)


def follow(url: URL, run_id: uuid.UUID) -> ResyncRun:
    """Poll the run until it ends, showing succeeded / conflict / failed as they happen
    (a live progress bar, not shown with `--json`)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "[green]{task.fields[ok]} ok [yellow]{task.fields[conflict]} conflict "
            "[red]{task.fields[failed]} failed"
        ),
    )

    async def poll() -> ResyncRun:
        engine = create_engine(url, pool_size=1)
        try:
            with Progress(*columns, console=stdout, disable=wants_json()) as progress:
                bar = progress.add_task("resync", total=None, ok=0, conflict=0, failed=0)
                while True:
                    async with transaction(engine) as session:
                        found = await resync.get_run(session, run_id)
                    c = found.counts
                    progress.update(
                        bar,
                        total=c.total,
                        completed=c.total - c.pending,
                        description=f"{found.template} v{found.version}: {found.status}",
                        ok=c.succeeded,
                        conflict=c.conflict,
                        failed=c.failed,
                    )
                    if found.status in resync.FINISHED:
                        return found
                    await asyncio.sleep(0.5)
        finally:
            await engine.dispose()

    return asyncio.run(poll())
