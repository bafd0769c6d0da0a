"""Organizations, their installs, and one install: drift per path, history, reconcile and
detach."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, Template

from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.deps import OrgPath, Session
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.orgs import service as orgs
from install_service.templates.schemas import Kind, Slug

# What the install page says after a form, by the redirect's `done` parameter.
DONE = {
    "reconciled": "Drifted rows were made equal to the installed release again; "
    "every value overwritten is in the history.",
    "reconciled-none": "Nothing had drifted: nothing was changed.",
    "detached": "The row was detached: the organization owns it now, and upgrades leave it alone.",
    "detached-none": "That row was already detached.",
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
        report = await repair.drift(session, viewer.actor, install_id)
        events = await installs.history(session, viewer.actor, install_id, page_of(cursor))
        return page(
            request,
            "install.html.j2",
            install=report.install,
            drift=report.drift,
            history=events,
            done=DONE.get(done or ""),
        )

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
