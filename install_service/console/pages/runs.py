"""Resync runs: the list, one run with live progress bars (the run's and each wave's) and a
chart of its outcomes over time; pausing, resuming and cancelling it, and retrying a finished
run's conflicts and failures.

The run page's live part (`/runs/{id}/live`) is re-requested by htmx every second while the
run is unfinished; the fragment it returns for a finished run stops asking. Everything a run
shows comes from `install_service.resync.service`; what is drawn comes from `charts`.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Redirect, Template
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.console import charts
from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.db.session import transaction
from install_service.deps import Session
from install_service.pagination import PageRequest
from install_service.resync import control, jobs
from install_service.resync import service as resync

# How often the live part of an unfinished run's page asks again.
POLL_SECONDS = 1


# The most conflicting (failed) organizations a run's page lists; the API pages through all.
LISTED = 200


async def _run_context(session: AsyncSession, run_id: uuid.UUID) -> dict[str, Any]:
    run = await resync.get_run(session, run_id)
    timeline = await resync.timeline(session, run_id)
    troubled = [
        item
        for status in ("conflict", "failed")
        for item in (
            await resync.list_items(session, run_id, PageRequest(limit=LISTED), status=status)
        ).items
    ]
    troubled.sort(key=lambda item: (item.wave, item.organization.slug))
    # A halted run's `current_wave` is the wave a resume starts; the wave that halted it is
    # the last one before it that had items (empty waves in between are passed over).
    halted_wave = (
        max((w.wave for w in run.waves if w.wave < run.current_wave and w.total), default=None)
        if run.status == "halted"
        else None
    )
    return {
        "run": run,
        "halted_wave": halted_wave,
        "finished": run.status in resync.FINISHED,
        "troubled": troubled,
        "listed": LISTED,
        "segments": charts.progress(run.counts),
        "waves": [(wave, charts.progress(wave)) for wave in run.waves],
        "bands": charts.bands(timeline),
        "timeline": timeline,
        "chart": {"width": charts.WIDTH, "height": charts.HEIGHT},
        "poll_seconds": POLL_SECONDS,
    }


class RunPages(Controller):
    path = "/runs"

    @get("/", name="console:runs")
    async def list_runs(
        self,
        request: AnyRequest,
        session: Session,
        admin: SignedIn,
        cursor: Cursor = None,
        template: Annotated[str | None, QueryParameter(max_length=100)] = None,
    ) -> Template:
        runs = await resync.list_runs(session, page_of(cursor), template=template or None)
        progress = {run.id: charts.progress(run.counts) for run in runs.items}
        return page(
            request,
            "runs.html.j2",
            runs=runs,
            progress=progress,
            template=template or "",
            width=charts.WIDTH,
        )

    @get("/{run_id:uuid}", name="console:run")
    async def run(
        self,
        request: AnyRequest,
        session: Session,
        admin: SignedIn,
        run_id: FromPath[uuid.UUID],
        joined: Annotated[str | None, QueryParameter(max_length=10)] = None,
    ) -> Template:
        context = await _run_context(session, run_id)
        return page(request, "run.html.j2", joined=joined is not None, **context)

    @get("/{run_id:uuid}/live", name="console:run-live")
    async def live(
        self, request: AnyRequest, session: Session, admin: SignedIn, run_id: FromPath[uuid.UUID]
    ) -> Template:
        """The run page's live part alone (progress, chart, items, retry)."""
        return page(request, "run_live.html.j2", **await _run_context(session, run_id))

    @post("/{run_id:uuid}/retry")
    async def retry(self, state: State, admin: SignedIn, run_id: FromPath[uuid.UUID]) -> Redirect:
        """What `POST /api/v1/admin/resync-runs/{id}/retry` does, committed before its jobs
        are deferred."""
        async with transaction(state.engine) as session:
            run = await control.retry_run(session, run_id, actor=admin.actor)
        await jobs.wake(state.jobs, run)
        return after_form(f"/console/runs/{run.id}")

    @post("/{run_id:uuid}/pause")
    async def pause(self, state: State, admin: SignedIn, run_id: FromPath[uuid.UUID]) -> Redirect:
        """What `POST /api/v1/admin/resync-runs/{id}/pause` does."""
        async with transaction(state.engine) as session:
            run = await control.pause(session, run_id, actor=admin.actor)
        return after_form(f"/console/runs/{run.id}")

    @post("/{run_id:uuid}/resume")
    async def resume(self, state: State, admin: SignedIn, run_id: FromPath[uuid.UUID]) -> Redirect:
        """What `POST /api/v1/admin/resync-runs/{id}/resume` does, committed before its jobs
        are deferred."""
        async with transaction(state.engine) as session:
            run = await control.resume(session, run_id, actor=admin.actor)
        await jobs.wake(state.jobs, run)
        return after_form(f"/console/runs/{run.id}")

    @post("/{run_id:uuid}/cancel")
    async def cancel(self, state: State, admin: SignedIn, run_id: FromPath[uuid.UUID]) -> Redirect:
        """What `POST /api/v1/admin/resync-runs/{id}/cancel` does."""
        async with transaction(state.engine) as session:
            run = await control.cancel(session, run_id, actor=admin.actor)
        return after_form(f"/console/runs/{run.id}")
