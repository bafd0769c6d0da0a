"""Templates, their releases, a side-by-side release diff, and starting a resync."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, Template

from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.db.session import transaction
from install_service.deps import Session
from install_service.errors import BadRequest
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest
from install_service.templates import service as templates

Version = Annotated[int, QueryParameter(ge=1, le=2_147_483_647)]


class ResyncForm(msgspec.Struct, kw_only=True):
    # Empty: the latest release.
    version: str = ""
    force: str = ""


class TemplatePages(Controller):
    path = "/templates"

    @get("/", name="console:templates")
    async def list_templates(
        self, request: AnyRequest, session: Session, viewer: SignedIn, cursor: Cursor = None
    ) -> Template:
        found = await templates.list_templates(session, viewer.actor, page_of(cursor))
        return page(request, "templates.html.j2", templates=found)

    @get("/{slug:str}", name="console:template")
    async def template(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        slug: FromPath[str],
        cursor: Cursor = None,
    ) -> Template:
        manifest = await templates.manifest(session, viewer.actor, slug)
        releases = await templates.list_releases(session, viewer.actor, slug, page_of(cursor))
        return page(request, "template.html.j2", manifest=manifest, releases=releases)

    @get("/{slug:str}/diff", name="console:diff")
    async def diff(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        slug: FromPath[str],
        from_version: Annotated[int, QueryParameter(name="from", ge=1, le=2_147_483_647)],
        to_version: Annotated[int, QueryParameter(name="to", ge=1, le=2_147_483_647)],
    ) -> Template:
        found = await templates.release_diff(session, viewer.actor, slug, from_version, to_version)
        return page(request, "diff.html.j2", diff=found)

    @post("/{slug:str}/resync")
    async def start_resync(
        self,
        state: State,
        admin: SignedIn,
        slug: FromPath[str],
        data: Annotated[ResyncForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Redirect:
        """What `POST /api/v1/admin/templates/{slug}/resync` does: the run is committed before
        its jobs are deferred, so a worker always finds it."""
        version = _version(data.version)
        request = ResyncRequest(version=version, force=data.force == "on")
        async with transaction(state.engine) as session:
            run = await resync.start_run(session, admin.actor, slug, request)
        await jobs.wake(state.jobs, run)
        return after_form(f"/console/runs/{run.id}")


def _version(value: str) -> int | None:
    """The form's release (empty: the latest); anything but a version number is a 400."""
    if not value.strip():
        return None
    if not value.strip().isdigit() or not 1 <= int(value) <= 2_147_483_647:
        raise BadRequest(f"release {value!r} is not a version number", code="invalid_version")
    return int(value)
