"""`resync` and `runs`: move the installs of a template to a release in background workers,
wave by wave; dry-run it; list, follow, pause, resume, cancel and retry runs."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import click

from install_service.actor import Actor
from install_service.cli.base import BadRequest, database_url, main, request, run
from install_service.cli.output import emit, json_option, note, stdout, table, wants_json
from install_service.states import FINISHED, ITEM_STATUSES, RUN_STATUSES

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.progress import TaskID
    from sqlalchemy.engine import URL

    from install_service.resync.schemas import FleetPlan, ResyncRun

wait_option = click.option(
    "--wait",
    is_flag=True,
    help="Follow the run with a progress bar per wave until it ends, halts or is paused.",
)
# `--wait` stops following a run in these states: nothing happens without a person.
_SETTLED = (*FINISHED, "halted", "paused")


def _summary(run: ResyncRun) -> str:
    c = run.counts
    text = (
        f"run {run.id}: {run.template} v{run.version} {run.status}: "
        f"{c.succeeded} succeeded, {c.conflict} conflict, {c.failed} failed, "
        f"{c.skipped} skipped, {c.cancelled} cancelled, {c.pending} pending of {c.total}"
    )
    if run.halt_reason:
        text += f"\nhalted: {run.halt_reason}"
    if run.next_step_at and run.status in ("scheduled", "baking"):
        text += f"\nwave {run.current_wave} starts at {run.next_step_at.isoformat()}"
    return text


def _run_view(run: ResyncRun) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    if len(run.waves) <= 1:
        return Text(_summary(run))
    waves = table(
        "waves",
        [
            "wave",
            "total",
            "pending",
            "succeeded",
            "conflict",
            "failed",
            "skipped",
            "cancelled",
        ],
        run.waves,
    )
    return Group(Text(_summary(run)), waves)


def _finish(url: URL, run_: ResyncRun, wait: bool) -> None:
    if wait:
        run_ = follow(url, run_.id)
    emit(run_, view=_run_view)


def _wake(url: URL, run_: ResyncRun) -> None:
    """Queue the committed run's jobs: workers in `serve` or `worker` pick them up."""
    from install_service.resync import jobs

    async def wake() -> None:
        async with jobs.opened(url) as queue:
            await jobs.wake(queue, run_)

    asyncio.run(wake())


def _wave(spec: str) -> dict[str, Any]:
    """`--wave` as the API's wave: `N` (count), `P%` (percent) or `orgs:A,B`."""
    if spec.startswith("orgs:"):
        return {"orgs": [org for org in spec[5:].split(",") if org]}
    try:
        if spec.endswith("%"):
            return {"percent": float(spec[:-1])}
        return {"count": int(spec)}
    except ValueError:
        raise BadRequest(f"--wave {spec!r}: expected N, P% or orgs:A,B") from None


def _plan_view(plan: FleetPlan) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    t = plan.totals
    summary = Text(
        f"dry run: {plan.template} -> release {plan.version}: {t.upgrade} upgrade, "
        + (f"{t.install} install, " if t.install else "")
        + f"{t.unchanged} unchanged, {t.conflict} conflict, {t.skipped} skipped"
    )
    counted = ["upgrade", *(["install"] if t.install else []), "unchanged", "conflict"]
    waves = table("waves", ["wave", *counted, "skipped"], plan.waves)
    conflicts = table(
        "predicted conflicts",
        [
            ("organization", lambda i: i.organization.slug),
            "wave",
            (
                "conflicts",
                lambda i: "; ".join(
                    f"{c['kind']}:{c['slug']} {c['reason']}"
                    + (f" {', '.join(c['fields'])}" if c.get("fields") else "")
                    for c in i.conflicts or []
                ),
            ),
        ],
        [i for i in plan.items if i.outcome == "conflict"],
    )
    return Group(summary, waves, conflicts)


@main.command("resync")
@click.argument("template")
@click.option("--version", type=int, help="Release to move to (default: latest).")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@click.option("--dry-run", is_flag=True, help="Show what each org would get; write nothing.")
@click.option("--org", "orgs", multiple=True, help="Only this organization. Repeatable.")
@click.option("--exclude", multiple=True, help="Never this organization. Repeatable.")
@click.option(
    "--wave",
    "waves",
    multiple=True,
    metavar="N|P%|orgs:A,B",
    help="A wave: the next N installs, up to P% of them, or these organizations. "
    "Repeatable, in order; the rest form one last wave.",
)
@click.option("--max-conflict-rate", type=float, help="Halt after a wave above this (0..1).")
@click.option("--max-failure-rate", type=float, help="Halt after a wave above this (0..1).")
@click.option("--bake", "bake_seconds", type=int, help="Seconds to wait after each wave.")
@click.option("--start-at", help="When to start (ISO 8601 with a time zone).")
@click.option("--include-pinned", is_flag=True, help="Move pinned installs too.")
@click.option(
    "--install",
    is_flag=True,
    help="Also install the template into the --org organizations that lack it (a bulk install).",
)
@click.option(
    "--with-requirements",
    is_flag=True,
    help="Install or upgrade, in each organization, the templates the release requires.",
)
@wait_option
@json_option
def resync_command(
    template: str,
    version: int | None,
    force: bool,
    dry_run: bool,
    orgs: tuple[str, ...],
    exclude: tuple[str, ...],
    waves: tuple[str, ...],
    max_conflict_rate: float | None,
    max_failure_rate: float | None,
    bake_seconds: int | None,
    start_at: str | None,
    include_pinned: bool,
    install: bool,
    with_requirements: bool,
    wait: bool,
) -> None:
    """Move the active installs of TEMPLATE to a release, in background workers.

    Workers run inside `install-service serve`, or alone with `install-service worker`.
    While a run of TEMPLATE is unfinished, the same request follows that run instead of
    starting one; a different one is refused.
    """
    from install_service.resync import fleet
    from install_service.resync import service as resync
    from install_service.resync.schemas import ResyncRequest

    body = request(
        ResyncRequest,
        version=version,
        force=force,
        dry_run=dry_run,
        orgs=list(orgs) or None,
        exclude=list(exclude),
        waves=[_wave(spec) for spec in waves],
        max_conflict_rate=max_conflict_rate,
        max_failure_rate=max_failure_rate,
        bake_seconds=bake_seconds,
        start_at=start_at,
        include_pinned=include_pinned,
        install=install,
        with_requirements=with_requirements,
    )
    url = database_url()
    if body.dry_run:
        emit(
            run(lambda s: fleet.dry_run(s, Actor.system(), template, body), url=url),
            view=_plan_view,
        )
        return
    run_ = run(lambda s: resync.start_run(s, Actor.system(), template, body), url=url)
    _wake(url, run_)
    joined = "" if run_.created else " (already in progress; following it)"
    note(f"resync run {run_.id}: {template} -> release {run_.version}{joined}")
    _finish(url, run_, wait)


@main.group("runs")
def runs_group() -> None:
    """Resync runs: list, follow, items, pause, resume, cancel, retry."""


@runs_group.command("list")
@click.option("--template", help="Only this template's runs.")
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@json_option
def runs_list(template: str | None, status: str | None) -> None:
    """Resync runs, newest first."""
    from install_service.pagination import walk
    from install_service.resync import service as resync

    async def work(session: Any) -> Any:
        return await walk(
            lambda page: resync.list_runs(session, page, template=template, status=status)
        )

    emit(
        run(work),
        title="resync runs",
        columns=[
            "id",
            "template",
            "version",
            "status",
            ("wave", lambda r: f"{r.current_wave}/{len(r.waves)}"),
            ("done", lambda r: f"{r.counts.total - r.counts.pending}/{r.counts.total}"),
            ("conflict", lambda r: r.counts.conflict),
            ("failed", lambda r: r.counts.failed),
            "created_at",
        ],
    )


@runs_group.command("show")
@click.argument("run_id", type=click.UUID)
@wait_option
@json_option
def runs_show(run_id: uuid.UUID, wait: bool) -> None:
    """A run's status and counts, overall and per wave."""
    from install_service.resync import service as resync

    url = database_url()
    _finish(url, run(lambda s: resync.get_run(s, run_id), url=url), wait)


@runs_group.command("items")
@click.argument("run_id", type=click.UUID)
@click.option("--status", type=click.Choice(ITEM_STATUSES), help="Only items in this status.")
@click.option("--wave", type=click.IntRange(min=1), help="Only this wave's items.")
@json_option
def runs_items(run_id: uuid.UUID, status: str | None, wave: int | None) -> None:
    """A run's items, wave by wave, with their conflicts and errors."""
    from install_service.pagination import walk
    from install_service.resync import service as resync

    async def work(session: Any) -> Any:
        return await walk(
            lambda page: resync.list_items(session, run_id, page, status=status, wave=wave)
        )

    emit(
        run(work),
        title=f"items of run {run_id}",
        columns=[
            ("organization", lambda i: i.organization.slug),
            "wave",
            "status",
            "reason",
            "attempts",
            (
                "detail",
                lambda i: (
                    "; ".join(f"{x['kind']}:{x['slug']} {x['reason']}" for x in i.conflicts or [])
                    or i.error
                ),
            ),
        ],
    )


@runs_group.command("pause")
@click.argument("run_id", type=click.UUID)
@json_option
def runs_pause(run_id: uuid.UUID) -> None:
    """Claim no new item of the run; items already claimed finish."""
    from install_service.resync import control

    emit(run(lambda s: control.pause(s, run_id)), view=_run_view)


@runs_group.command("resume")
@click.argument("run_id", type=click.UUID)
@wait_option
@json_option
def runs_resume(run_id: uuid.UUID, wait: bool) -> None:
    """Continue a paused or halted run (a halted one with its next wave)."""
    from install_service.resync import control

    url = database_url()
    run_ = run(lambda s: control.resume(s, run_id), url=url)
    _wake(url, run_)
    _finish(url, run_, wait)


@runs_group.command("cancel")
@click.argument("run_id", type=click.UUID)
@json_option
def runs_cancel(run_id: uuid.UUID) -> None:
    """Stop the run for good: pending items are cancelled, orgs already moved stay."""
    from install_service.resync import control

    emit(run(lambda s: control.cancel(s, run_id)), view=_run_view)


@runs_group.command("retry")
@click.argument("run_id", type=click.UUID)
@wait_option
@json_option
def runs_retry(run_id: uuid.UUID, wait: bool) -> None:
    """Queue a finished run's conflicted and failed items again."""
    from install_service.resync import control

    url = database_url()
    run_ = run(lambda s: control.retry_run(s, run_id), url=url)
    _wake(url, run_)
    _finish(url, run_, wait)


def follow(url: URL, run_id: uuid.UUID) -> ResyncRun:
    """Poll the run until it ends, halts or is paused, with a live progress bar per wave
    (not shown with `--json`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from install_service.db.engine import create_engine
    from install_service.db.session import transaction
    from install_service.resync import service as resync

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "[green]{task.fields[ok]} ok [yellow]{task.fields[conflict]} conflict "
            "[red]{task.fields[failed]} failed [dim]{task.fields[skipped]} skipped"
        ),
    )

    async def poll() -> ResyncRun:
        engine = create_engine(url, pool_size=1)
        bars: dict[int, TaskID] = {}
        try:
            with Progress(*columns, console=stdout(), disable=wants_json()) as progress:
                while True:
                    async with transaction(engine) as session:
                        found = await resync.get_run(session, run_id)
                    for wave in found.waves:
                        if wave.wave not in bars:
                            bars[wave.wave] = progress.add_task(
                                "", total=None, ok=0, conflict=0, failed=0, skipped=0
                            )
                        current = wave.wave == found.current_wave
                        progress.update(
                            bars[wave.wave],
                            total=wave.total,
                            completed=wave.total - wave.pending,
                            description=f"{found.template} v{found.version} wave {wave.wave}"
                            + (f": {found.status}" if current else ""),
                            ok=wave.succeeded,
                            conflict=wave.conflict,
                            failed=wave.failed,
                            skipped=wave.skipped,
                        )
                    if found.status in _SETTLED:
                        return found
                    await asyncio.sleep(0.5)
        finally:
            await engine.dispose()

    return asyncio.run(poll())
