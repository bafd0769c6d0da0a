"""Admin HTTP endpoints for resync runs: start (or dry-run), read, list, control."""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from install_service.db.session import transaction
from install_service.deps import BEARER, PageParams, Session, User
from install_service.problems import ADMIN, WITH_BODY, NoBadRequest, problems
from install_service.resync import control, fleet, jobs
from install_service.resync import service as resync
from install_service.resync.schemas import (
    FleetPlan,
    ResyncItemPage,
    ResyncRequest,
    ResyncRun,
    ResyncRunPage,
)
from install_service.states import ItemStatus, RunStatus


class AdminResyncController(Controller):
    path = "/api/v1/admin"
    tags = ("admin",)
    security = BEARER

    @post(
        "/templates/{slug:str}/resync",
        operation_id="startResync",
        summary="Move the active installs of a template to a release, wave by wave",
        description="Runs in background workers, a batch of organizations per transaction "
        "(each organization's outcome its own), wave after wave (default: one wave of every "
        "selected install). While a run of this "
        "template is unfinished, the identical request returns it (`created: false`) and any "
        "other is a 409 naming it. With `dry_run: true`, answers 200 with what the run would "
        "do to each install (items paginated by `cursor` and `limit`) and writes nothing.",
        status_code=202,
        responses={
            **problems(*ADMIN, *WITH_BODY, 404, 409, 422),
            200: ResponseSpec(FleetPlan, description="The fleet dry run (`dry_run: true`)"),
        },
    )
    async def start(
        self,
        request: Request,  # type: ignore[type-arg]
        state: State,
        admin: User,
        slug: FromPath[str],
        data: JSONBody[ResyncRequest],
        page: PageParams,
    ) -> Response[ResyncRun | FleetPlan]:
        request.state.template = slug
        if data.dry_run:
            async with transaction(state.engine) as session:
                plan = await fleet.dry_run(session, admin, slug, data, page)
            request.state.outcome = "dry_run"
            return Response(plan, status_code=200)
        # Committed before its jobs are deferred, so a worker always finds the run.
        async with transaction(state.engine) as session:
            run = await resync.start_run(session, admin, slug, data)
        await jobs.wake(state.jobs, run)
        return Response(run, status_code=202)

    @get(
        "/resync-runs",
        operation_id="listResyncRuns",
        summary="Resync runs, newest first",
        responses=problems(*ADMIN, 400, 404),
    )
    async def list_runs(
        self,
        session: Session,
        admin: User,
        page: PageParams,
        template: Annotated[
            str | None, QueryParameter(max_length=100, description="Only this template's runs.")
        ] = None,
        status: Annotated[
            RunStatus | None, QueryParameter(description="Only runs in this status.")
        ] = None,
    ) -> ResyncRunPage:
        return await resync.list_runs(session, page, template=template, status=status)

    @get(
        "/resync-runs/{run_id:uuid}",
        operation_id="getResyncRun",
        operation_class=NoBadRequest,
        summary="A run's status and counts, overall and per wave",
        responses=problems(*ADMIN, 404),
    )
    async def get_run(
        self, session: Session, admin: User, run_id: FromPath[uuid.UUID]
    ) -> ResyncRun:
        return await resync.get_run(session, run_id)

    @get(
        "/resync-runs/{run_id:uuid}/items",
        operation_id="listResyncRunItems",
        summary="A run's items, wave by wave",
        responses=problems(*ADMIN, 400, 404),
    )
    async def list_items(
        self,
        session: Session,
        admin: User,
        run_id: FromPath[uuid.UUID],
        page: PageParams,
        status: Annotated[
            ItemStatus | None, QueryParameter(description="Only items in this status.")
        ] = None,
        wave: Annotated[
            int | None, QueryParameter(ge=1, le=1_000, description="Only this wave's items.")
        ] = None,
    ) -> ResyncItemPage:
        return await resync.list_items(session, run_id, page, status=status, wave=wave)

    @post(
        "/resync-runs/{run_id:uuid}/pause",
        operation_id="pauseResyncRun",
        operation_class=NoBadRequest,
        summary="Claim no new item; items already claimed finish",
        description="Pausing a paused or halted run changes nothing; a finished run is a 409.",
        status_code=200,
        responses=problems(*ADMIN, 404, 409),
    )
    async def pause(self, state: State, admin: User, run_id: FromPath[uuid.UUID]) -> ResyncRun:
        async with transaction(state.engine) as session:
            return await control.pause(session, run_id, actor=admin)

    @post(
        "/resync-runs/{run_id:uuid}/resume",
        operation_id="resumeResyncRun",
        operation_class=NoBadRequest,
        summary="Continue a paused or halted run",
        description="A halted run goes on with the next wave. Resuming a run that is not "
        "stopped changes nothing; a finished run is a 409.",
        status_code=200,
        responses=problems(*ADMIN, 404, 409),
    )
    async def resume(self, state: State, admin: User, run_id: FromPath[uuid.UUID]) -> ResyncRun:
        async with transaction(state.engine) as session:
            run = await control.resume(session, run_id, actor=admin)
        await jobs.wake(state.jobs, run)
        return run

    @post(
        "/resync-runs/{run_id:uuid}/cancel",
        operation_id="cancelResyncRun",
        operation_class=NoBadRequest,
        summary="Stop for good: pending items are cancelled, moved orgs stay as they are",
        description="Cancelling a cancelled run changes nothing; a run that succeeded, is "
        "partial or failed is a 409.",
        status_code=200,
        responses=problems(*ADMIN, 404, 409),
    )
    async def cancel(self, state: State, admin: User, run_id: FromPath[uuid.UUID]) -> ResyncRun:
        async with transaction(state.engine) as session:
            return await control.cancel(session, run_id, actor=admin)

    @post(
        "/resync-runs/{run_id:uuid}/retry",
        operation_id="retryResyncRun",
        operation_class=NoBadRequest,
        summary="Queue a finished run's conflicted and failed items again",
        status_code=202,
        responses=problems(*ADMIN, 404, 409),
    )
    async def retry(self, state: State, admin: User, run_id: FromPath[uuid.UUID]) -> ResyncRun:
        async with transaction(state.engine) as session:
            run = await control.retry_run(session, run_id, actor=admin)
        await jobs.wake(state.jobs, run)
        return run
