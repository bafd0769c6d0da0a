"""The watchers' desired state over HTTP."""

from __future__ import annotations

from litestar import Controller, get

from install_service.deps import BEARER, OrgPath, PageParams, Session, User
from install_service.problems import SIGNED_IN, problems
from install_service.watchers import service
from install_service.watchers.schemas import WatcherStatePage


class OrganizationWatchersController(Controller):
    path = "/api/v1/organizations"
    tags = ("watchers",)
    security = BEARER

    @get(
        "/{org:str}/watchers",
        operation_id="listOrganizationWatchers",
        summary="Every active watcher: what to run, when, with what",
        description="The desired state a runner reconciles against, by slug: each watcher's "
        "current version, its schedule (5-field cron, UTC) and `next_run_at`. Follow the "
        "organization's events to know when to read it again.",
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def watchers(
        self, session: Session, user: User, org: OrgPath, page: PageParams
    ) -> WatcherStatePage:
        return await service.desired_state(session, user, org, page)
