"""Admin HTTP endpoints for resync runs."""

from __future__ import annotations

import uuid

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody

from install_service.db.session import transaction
from install_service.deps import BEARER, Session, User
from install_service.problems import ADMIN, WITH_BODY, NoBadRequest, problems
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest, ResyncRun


class AdminResyncController(Controller):
    path = "/api/v1/admin"
    tags = ("admin",)
    security = BEARER

    @post(
        "/templates/{slug:str}/resync",
        operation_id="startResync",
        summary="Move every active install of a template to a release (default: latest)",
        description="Runs in background workers, one transaction per organization. While a run "
        "of this template is queued or running, this returns that run (`created: false`).",
        status_code=202,
        responses=problems(*ADMIN, *WITH_BODY, 404),
    )
    async def start(
        self,
        request: Request,  # type: ignore[type-arg]
        state: State,
        admin: User,
        slug: FromPath[str],
        data: JSONBody[ResyncRequest],
    ) -> Response[ResyncRun]:
        request.state.template = slug
        # Committed before its jobs are deferred, so a worker always finds the run.
        async with transaction(state.engine) as session:
            run = await resync.start_run(
                session, admin, slug, version=data.version, force=data.force
            )
        if run.status in ("queued", "running"):
            await jobs.defer_run(state.jobs, run.id)
        return Response(run, status_code=202)

    @get(
        "/resync-runs/{run_id:uuid}",
        operation_id="getResyncRun",
        operation_class=NoBadRequest,
        summary="A run's status, counts and unfinished items",
        responses=problems(*ADMIN, 404),
    )
    async def get_run(
        self, session: Session, admin: User, run_id: FromPath[uuid.UUID]
    ) -> ResyncRun:
        return await resync.get_run(session, run_id)

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
            run = await resync.retry_run(session, run_id, actor=admin)
        await jobs.defer_run(state.jobs, run.id)
        return run
