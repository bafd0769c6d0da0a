"""Templates, their releases, a side-by-side release diff, and starting a staged resync after
seeing its fleet dry run."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Template
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.console.auth import Viewer
from install_service.console.forms import ResyncForm
from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.db.session import transaction
from install_service.deps import Session
from install_service.errors import InstallServiceError
from install_service.installs import service as installs
from install_service.resync import fleet, jobs
from install_service.resync import service as resync
from install_service.resync.schemas import FleetPlan
from install_service.templates import service as templates


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
        installs_cursor: Cursor = None,
    ) -> Template:
        """A template: its releases, what its latest release contains, and the installs of
        it the viewer can see."""
        manifest = await templates.manifest(session, viewer.actor, slug)
        releases = await templates.list_releases(session, viewer.actor, slug, page_of(cursor))
        latest = await templates.release(session, viewer.actor, slug, manifest.latest_version or 1)
        installed = await installs.list_template_installs(
            session, viewer.actor, slug, page_of(installs_cursor)
        )
        return page(
            request,
            "template.html.j2",
            manifest=manifest,
            releases=releases,
            latest=latest,
            installed=installed,
            form=ResyncForm.default(),
        )

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

    @get("/{slug:str}/resync", name="console:resync")
    async def resync_preview(
        self,
        request: AnyRequest,
        session: Session,
        admin: SignedIn,
        slug: FromPath[str],
        preview: Annotated[str | None, QueryParameter(max_length=10)] = None,
    ) -> Template:
        """The staged-resync form; filled in (`preview`), the fleet dry run of it: what
        `POST /api/v1/admin/templates/{slug}/resync` with `dry_run: true` answers, and the
        button that starts that run."""
        if preview is None:
            return await _resync_page(request, session, admin, slug, ResyncForm.default())
        form = ResyncForm.read(request.query_params)
        try:
            plan = await fleet.dry_run(session, admin.actor, slug, form.request(dry_run=True))
        except InstallServiceError as exc:
            return await _resync_page(request, session, admin, slug, form, refused=exc)
        return await _resync_page(request, session, admin, slug, form, plan=plan)

    @post("/{slug:str}/resync")
    async def start_resync(
        self, request: AnyRequest, state: State, admin: SignedIn, slug: FromPath[str]
    ) -> Response[Any]:
        """What `POST /api/v1/admin/templates/{slug}/resync` does: the run is committed before
        its jobs are deferred, so a worker always finds it. A refusal (bad values, unknown
        organizations, another unfinished run) comes back on the form, values kept."""
        form = ResyncForm.read(await request.form())
        try:
            async with transaction(state.engine) as session:
                run = await resync.start_run(session, admin.actor, slug, form.request())
        except InstallServiceError as exc:
            if exc.status == 401:
                raise
            async with transaction(state.engine) as session:
                return await _resync_page(request, session, admin, slug, form, refused=exc)
        await jobs.wake(state.jobs, run)
        return after_form(f"/console/runs/{run.id}" + ("" if run.created else "?joined=1"))


# The most organizations a dry run's page lists as conflicting or skipped (the API pages
# through every one).
LISTED = 200


async def _resync_page(
    request: AnyRequest,
    session: AsyncSession,
    admin: Viewer,
    slug: str,
    form: ResyncForm,
    *,
    plan: FleetPlan | None = None,
    refused: InstallServiceError | None = None,
) -> Template:
    manifest = await templates.manifest(session, admin.actor, slug)
    if refused is not None:
        request.state.outcome = refused.code
    noted = [item for item in plan.items if item.outcome in ("conflict", "skipped")] if plan else []
    return page(
        request,
        "resync.html.j2",
        status=refused.status if refused else 200,
        manifest=manifest,
        form=form,
        plan=plan,
        noted=noted[:LISTED],
        more=max(0, len(noted) - LISTED),
        refused=refused,
    )
