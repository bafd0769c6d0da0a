"""HTTP endpoints for installs: install, upgrade/rollback, uninstall, history, drift."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from install_service import metrics
from install_service.deps import BEARER, OrgPath, PageParams, Session, User, unit_of_work
from install_service.errors import InstallServiceError
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.installs.schemas import (
    DetachRequest,
    DriftReport,
    HistoryPage,
    Install,
    InstallPage,
    InstallRequest,
    InstallResult,
    PinRequest,
    ReconcileRequest,
    UpgradeRequest,
)
from install_service.problems import SIGNED_IN, WITH_BODY, NoBadRequest, problems


def _note(request: Request, result: InstallResult) -> InstallResult:  # type: ignore[type-arg]
    request.state.org = result.organization.slug
    request.state.template = result.template.slug
    request.state.outcome = "dry_run" if result.dry_run else result.action
    return result


class _Timed:
    """Count and time one engine call by its outcome, for the metrics endpoint."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, InstallServiceError):
            outcome = exc.code
        else:
            outcome = "error"
        metrics.INSTALLS.labels(self.action, outcome).inc()
        metrics.INSTALL_SECONDS.observe(time.perf_counter() - self.start)


class InstallsController(Controller):
    path = "/api/v1/installs"
    tags = ("installs",)
    security = BEARER

    @post(
        "/",
        operation_id="installTemplate",
        summary="Install a template into an organization",
        description="Idempotent: 201 when this request created the install; 200 when it "
        "existed (a no-op), was upgraded or rolled back, or for a dry run. 409 lists every "
        "conflict and writes nothing.",
        status_code=200,
        responses={
            **problems(*SIGNED_IN, *WITH_BODY, 403, 404, 409, 422),
            201: ResponseSpec(InstallResult, description="This request created the install"),
        },
    )
    async def install(
        self,
        request: Request,  # type: ignore[type-arg]
        state: State,
        user: User,
        data: JSONBody[InstallRequest],
    ) -> Response[InstallResult]:
        request.state.template = data.template
        request.state.org = data.organization
        arguments = msgspec.structs.asdict(data)
        with _Timed("install"):
            # A no-op is answered without a transaction; anything else runs in the request's.
            result = await installs.noop(state.engine, user, **arguments)
            if result is None:
                async with unit_of_work(state.engine, user) as session:
                    result = await installs.install(session, user, **arguments)
        return Response(_note(request, result), status_code=201 if result.created else 200)

    @get(
        "/{install_id:uuid}",
        operation_id="getInstall",
        operation_class=NoBadRequest,
        summary="One install",
        responses=problems(*SIGNED_IN, 404),
    )
    async def get_install(
        self, session: Session, user: User, install_id: FromPath[uuid.UUID]
    ) -> Install:
        return await installs.get_install(session, user, install_id)

    @get(
        "/{install_id:uuid}/history",
        operation_id="getInstallHistory",
        summary="An install's history, oldest first",
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def history(
        self, session: Session, user: User, install_id: FromPath[uuid.UUID], page: PageParams
    ) -> HistoryPage:
        return await installs.history(session, user, install_id, page)

    @get(
        "/{install_id:uuid}/drift",
        operation_id="getInstallDrift",
        operation_class=NoBadRequest,
        summary="Managed rows changed in the org since mirrored, path by path",
        responses=problems(*SIGNED_IN, 404),
    )
    async def drift(
        self, session: Session, user: User, install_id: FromPath[uuid.UUID]
    ) -> DriftReport:
        return await repair.drift(session, user, install_id)

    @post(
        "/{install_id:uuid}/reconcile",
        operation_id="reconcileInstall",
        summary="Make drifted managed rows equal the installed release again",
        description="Edited fields go back to the release's (`tenant` fields are left alone), "
        "archived or deleted rows come back, references are repaired; every local value "
        "overwritten is listed (and kept in the history).",
        status_code=200,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404, 409),
    )
    async def reconcile(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        user: User,
        install_id: FromPath[uuid.UUID],
        data: JSONBody[ReconcileRequest],
    ) -> InstallResult:
        with _Timed("reconcile"):
            result = await repair.reconcile(session, user, install_id, dry_run=data.dry_run)
        return _note(request, result)

    @post(
        "/{install_id:uuid}/detach",
        operation_id="detachInstallItem",
        summary="Take one managed row over: later upgrades leave it alone until adopted",
        status_code=200,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404),
    )
    async def detach(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        user: User,
        install_id: FromPath[uuid.UUID],
        data: JSONBody[DetachRequest],
    ) -> InstallResult:
        with _Timed("detach"):
            result = await repair.detach(session, user, install_id, kind=data.kind, slug=data.slug)
        return _note(request, result)

    @post(
        "/{install_id:uuid}/upgrade",
        operation_id="upgradeInstall",
        summary="Upgrade or roll back to a release (default: the latest); `pin` holds it there",
        status_code=200,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404, 409, 422),
    )
    async def upgrade(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        user: User,
        install_id: FromPath[uuid.UUID],
        data: JSONBody[UpgradeRequest],
    ) -> InstallResult:
        with _Timed("upgrade"):
            result = await installs.upgrade(
                session, user, install_id, **msgspec.structs.asdict(data)
            )
        return _note(request, result)

    @post(
        "/{install_id:uuid}/pin",
        operation_id="pinInstall",
        summary="Hold an install at its release: resyncs skip it until it is unpinned",
        description="`until` omitted: until unpinned. The org's own upgrades are never held. "
        "Pinning again the same way changes nothing.",
        status_code=200,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404, 422),
    )
    async def pin(
        self,
        session: Session,
        user: User,
        install_id: FromPath[uuid.UUID],
        data: JSONBody[PinRequest],
    ) -> Install:
        return await installs.pin(session, user, install_id, until=data.until, reason=data.reason)

    @delete(
        "/{install_id:uuid}/pin",
        operation_id="unpinInstall",
        operation_class=NoBadRequest,
        summary="Let resyncs move an install again",
        status_code=200,
        responses=problems(*SIGNED_IN, 403, 404),
    )
    async def unpin(self, session: Session, user: User, install_id: FromPath[uuid.UUID]) -> Install:
        return await installs.unpin(session, user, install_id)

    @delete(
        "/{install_id:uuid}",
        operation_id="uninstallTemplate",
        summary="Uninstall: archive managed rows, keep versions and history",
        description="409 `required_by` while installs in the organization require this one, "
        "unless `?cascade=true` uninstalls them first, in the same transaction.",
        status_code=200,
        responses=problems(*SIGNED_IN, 400, 403, 404, 409),
    )
    async def uninstall(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        user: User,
        install_id: FromPath[uuid.UUID],
        cascade: Annotated[
            bool,
            QueryParameter(description="Uninstall the installs that require this one first."),
        ] = False,
    ) -> InstallResult:
        with _Timed("uninstall"):
            result = await installs.uninstall(session, user, install_id, cascade=cascade)
        return _note(request, result)


class OrganizationInstallsController(Controller):
    path = "/api/v1/organizations"
    tags = ("installs",)
    security = BEARER

    @get(
        "/{org:str}/installs",
        operation_id="listOrganizationInstalls",
        summary="Installs in an organization (slug or id)",
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def list_installs(
        self, session: Session, user: User, org: OrgPath, page: PageParams
    ) -> InstallPage:
        return await installs.list_installs(session, user, org, page)
