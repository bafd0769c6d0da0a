"""Organizations, their installs, and one install: drift per path, history, reconcile,
detach, pin and unpin."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, Template
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.console.auth import Viewer
from install_service.console.forms import PinForm, UpgradeForm
from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.db.session import transaction
from install_service.deps import OrgPath, Session
from install_service.errors import InstallServiceError
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.orgs import service as orgs
from install_service.schemas import Kind, Slug

# What the install page says after a form, by the redirect's `done` parameter.
DONE = {
    "reconciled": "Drifted rows were made equal to the installed release again; "
    "every value overwritten is in the history.",
    "reconciled-none": "Nothing had drifted: nothing was changed.",
    "detached": "The row was detached: the organization owns it now, and upgrades leave it alone.",
    "detached-none": "That row was already detached.",
    "pinned": "Pinned: resyncs leave this install at its release until it is unpinned "
    "(or the pin ends).",
    "unpinned": "Unpinned: resyncs may move this install again.",
    "upgraded": "Upgraded: the organization's edits were merged with the release as chosen; "
    "the history says what changed.",
    "upgraded-none": "Nothing to do: the install was already at that release.",
}


class DetachForm(msgspec.Struct, kw_only=True):
    kind: Kind
    slug: Slug


class OrgPages(Controller):
    path = "/"

    @get("/orgs", name="console:orgs")
    async def list_orgs(
        self, request: AnyRequest, session: Session, viewer: SignedIn, cursor: Cursor = None
    ) -> Template:
        """Every organization for platform admins (as the admin API lists them), else the
        viewer's own, with their role."""
        if viewer.is_admin:
            every = await orgs.list_organizations(session, page_of(cursor))
            return page(request, "orgs.html.j2", organizations=every, memberships=None)
        mine = await orgs.list_memberships(session, viewer.actor, page_of(cursor))
        return page(request, "orgs.html.j2", organizations=None, memberships=mine)

    @get("/orgs/{org:str}", name="console:org")
    async def org(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        org: OrgPath,
        cursor: Cursor = None,
    ) -> Template:
        access = await orgs.resolve_org(session, viewer.actor, org)
        found = await installs.list_installs(session, viewer.actor, str(access.id), page_of(cursor))
        return page(request, "org.html.j2", org=access, installs=found)

    @get("/installs/{install_id:uuid}", name="console:install")
    async def install(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        install_id: FromPath[uuid.UUID],
        cursor: Cursor = None,
        done: Annotated[str | None, QueryParameter(max_length=50)] = None,
    ) -> Template:
        return await _install_page(
            request, session, viewer, install_id, cursor=cursor, done=DONE.get(done or "")
        )

    @post("/installs/{install_id:uuid}/pin")
    async def pin(
        self, request: AnyRequest, state: State, viewer: SignedIn, install_id: FromPath[uuid.UUID]
    ) -> Response[Any]:
        """What `POST /api/v1/installs/{id}/pin` does; a refusal comes back on the install's
        page, the form's values kept."""
        form = PinForm.read(await request.form())
        try:
            body = form.request()
            async with transaction(state.engine) as session:
                await installs.pin(
                    session, viewer.actor, install_id, until=body.until, reason=body.reason
                )
        except InstallServiceError as exc:
            if exc.status in (401, 404):
                raise
            async with transaction(state.engine) as session:
                return await _install_page(
                    request, session, viewer, install_id, pin_form=form, refused=exc
                )
        return after_form(f"/console/installs/{install_id}?done=pinned")

    @post("/installs/{install_id:uuid}/unpin")
    async def unpin(
        self, session: Session, viewer: SignedIn, install_id: FromPath[uuid.UUID]
    ) -> Redirect:
        """What `DELETE /api/v1/installs/{id}/pin` does."""
        await installs.unpin(session, viewer.actor, install_id)
        return after_form(f"/console/installs/{install_id}?done=unpinned")

    @get("/installs/{install_id:uuid}/upgrade", name="console:upgrade")
    async def upgrade_plan(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        install_id: FromPath[uuid.UUID],
        version: Annotated[int | None, QueryParameter(ge=1, le=2_147_483_647)] = None,
    ) -> Template:
        """What `POST /api/v1/installs/{id}/upgrade` with `dry_run: true` answers, and the
        form that upgrades to that release, a choice for each conflicting path."""
        return await _upgrade_page(
            request, session, viewer, install_id, UpgradeForm(version=str(version or ""))
        )

    @post("/installs/{install_id:uuid}/upgrade")
    async def upgrade(
        self, request: AnyRequest, state: State, viewer: SignedIn, install_id: FromPath[uuid.UUID]
    ) -> Response[Any]:
        """What `POST /api/v1/installs/{id}/upgrade` does with the release reviewed and the
        choices made (`with_requirements`: the templates it requires are installed or
        upgraded first, in the same transaction); a refusal comes back on the plan, the
        choices kept."""
        form = UpgradeForm.read(await request.form())
        try:
            body = form.request()
            async with transaction(state.engine) as session:
                result = await installs.upgrade(
                    session,
                    viewer.actor,
                    install_id,
                    version=body.version,
                    resolutions=body.resolutions,
                    adopt=body.adopt,
                    with_requirements=body.with_requirements,
                )
        except InstallServiceError as exc:
            if exc.status in (401, 404):
                raise
            async with transaction(state.engine) as session:
                return await _upgrade_page(request, session, viewer, install_id, form, refused=exc)
        done = "upgraded" if result.action != "none" else "upgraded-none"
        return after_form(f"/console/installs/{install_id}?done={done}")

    @get("/installs/{install_id:uuid}/reconcile", name="console:reconcile")
    async def reconcile_plan(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        install_id: FromPath[uuid.UUID],
    ) -> Template:
        """What `POST /api/v1/installs/{id}/reconcile` with `dry_run: true` answers: every
        value it would overwrite, and the button that does it."""
        plan = await repair.reconcile(session, viewer.actor, install_id, dry_run=True)
        found = await installs.get_install(session, viewer.actor, install_id)
        return page(request, "reconcile.html.j2", install=found, plan=plan)

    @post("/installs/{install_id:uuid}/reconcile")
    async def reconcile(
        self, session: Session, viewer: SignedIn, install_id: FromPath[uuid.UUID]
    ) -> Redirect:
        result = await repair.reconcile(session, viewer.actor, install_id)
        done: Literal["reconciled", "reconciled-none"] = (
            "reconciled" if result.action == "reconcile" else "reconciled-none"
        )
        return after_form(f"/console/installs/{install_id}?done={done}")

    @post("/installs/{install_id:uuid}/detach")
    async def detach(
        self,
        session: Session,
        viewer: SignedIn,
        install_id: FromPath[uuid.UUID],
        data: Annotated[DetachForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Redirect:
        result = await repair.detach(
            session, viewer.actor, install_id, kind=data.kind, slug=data.slug
        )
        done = "detached" if result.action == "detach" else "detached-none"
        return after_form(f"/console/installs/{install_id}?done={done}")


async def _install_page(
    request: AnyRequest,
    session: AsyncSession,
    viewer: Viewer,
    install_id: uuid.UUID,
    *,
    cursor: str | None = None,
    done: str | None = None,
    pin_form: PinForm | None = None,
    refused: InstallServiceError | None = None,
) -> Template:
    report = await repair.drift(session, viewer.actor, install_id)
    events = await installs.history(session, viewer.actor, install_id, page_of(cursor))
    newer = await installs.newer_release(session, viewer.actor, report.install)
    if refused is not None:
        request.state.outcome = refused.code
    return page(
        request,
        "install.html.j2",
        status=refused.status if refused else 200,
        install=report.install,
        drift=report.drift,
        history=events,
        done=done,
        pin_form=pin_form or PinForm(),
        refused=refused,
        newer=newer,
    )


async def _upgrade_page(
    request: AnyRequest,
    session: AsyncSession,
    viewer: Viewer,
    install_id: uuid.UUID,
    form: UpgradeForm,
    *,
    refused: InstallServiceError | None = None,
) -> Template:
    """The upgrade's dry run. Where the release requires templates the organization lacks
    (or has at too old a release), the page names them, and the plan is the one upgrading
    with them installed first would carry out."""
    version = int(form.version) if form.version.isdigit() else None
    unmet: list[dict[str, Any]] = []
    try:
        plan = await installs.upgrade(
            session, viewer.actor, install_id, version=version, dry_run=True
        )
    except InstallServiceError as exc:
        if exc.code != "missing_requirement":
            raise
        unmet = list(exc.extra.get("requirements") or [])
        plan = await installs.upgrade(
            session, viewer.actor, install_id, version=version, dry_run=True, with_requirements=True
        )
    found = await installs.get_install(session, viewer.actor, install_id)
    if refused is not None:
        request.state.outcome = refused.code
    return page(
        request,
        "upgrade.html.j2",
        status=refused.status if refused else 200,
        install=found,
        plan=plan,
        form=form,
        refused=refused,
        unmet=unmet,
    )
