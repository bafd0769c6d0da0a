"""An organization's own schema: every item with its provenance and an edited mark, and an
item's page that edits its fields (a watcher's prompt in a text area) through the same
service as `PATCH /api/v1/organizations/{org}/schema/{kind}/{slug}`."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, PathParameter, QueryParameter
from litestar.response import Template
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.console.auth import Viewer
from install_service.console.forms import SchemaItemForm
from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import after_form, page
from install_service.db.session import transaction
from install_service.deps import OrgPath, Session
from install_service.errors import InstallServiceError
from install_service.orgs import service as orgs
from install_service.pagination import PageRequest
from install_service.schema import service as schema
from install_service.schema.schemas import KINDS, KindPath

Kind = Annotated[KindPath, PathParameter()]
# Items of each kind the overview shows before a "Next page" link.
OVERVIEW_LIMIT = 50
DONE = {
    "saved": "Saved. Drift shows an edit of a managed item; upgrades merge it.",
    "unchanged": "Nothing was changed: the item already read that way.",
    "archived": "Archived: the item keeps its slug, versions and provenance.",
}


class SchemaPages(Controller):
    path = "/orgs/{org:str}/schema"

    @get("/", name="console:schema")
    async def overview(
        self, request: AnyRequest, session: Session, viewer: SignedIn, org: OrgPath
    ) -> Template:
        """Every kind's first page of items."""
        access = await orgs.resolve_org(session, viewer.actor, org)
        sections = [
            (
                path,
                await schema.list_items(
                    session, viewer.actor, str(access.id), kind, PageRequest(limit=OVERVIEW_LIMIT)
                ),
            )
            for path, kind in KINDS.items()
        ]
        return page(request, "schema.html.j2", org=access, sections=sections, single=False)

    @get("/{kind:str}", name="console:schema-kind")
    async def kind_page(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        org: OrgPath,
        kind: Kind,
        cursor: Cursor = None,
    ) -> Template:
        access = await orgs.resolve_org(session, viewer.actor, org)
        found = await schema.list_items(
            session, viewer.actor, str(access.id), KINDS[kind], page_of(cursor)
        )
        return page(request, "schema.html.j2", org=access, sections=[(kind, found)], single=True)

    @get("/{kind:str}/{slug:str}", name="console:schema-item")
    async def item(
        self,
        request: AnyRequest,
        session: Session,
        viewer: SignedIn,
        org: OrgPath,
        kind: Kind,
        slug: FromPath[str],
        done: Annotated[str | None, QueryParameter(max_length=50)] = None,
    ) -> Template:
        return await _item_page(
            request, session, viewer, org, kind, slug, done=DONE.get(done or "")
        )

    @post("/{kind:str}/{slug:str}")
    async def save(
        self,
        request: AnyRequest,
        state: State,
        viewer: SignedIn,
        org: OrgPath,
        kind: Kind,
        slug: FromPath[str],
    ) -> Response[Any]:
        """What `PATCH .../schema/{kind}/{slug}` does with the form's fields and its ETag as
        If-Match; a refusal comes back on the item's page, the fields as typed."""
        form = SchemaItemForm.read(KINDS[kind], await request.form())
        try:
            async with transaction(state.engine) as session:
                current = await schema.get_item(session, viewer.actor, org, KINDS[kind], slug)
                written = await schema.update_item(
                    session,
                    viewer.actor,
                    org,
                    KINDS[kind],
                    slug,
                    form.patch(current.document),
                    if_match=form.etag,
                )
        except InstallServiceError as exc:
            if exc.status in (401, 404):
                raise
            async with transaction(state.engine) as session:
                return await _item_page(
                    request, session, viewer, org, kind, slug, form=form, refused=exc
                )
        done = "saved" if written.changed else "unchanged"
        return after_form(f"/console/orgs/{org}/schema/{kind}/{slug}?done={done}")

    @post("/{kind:str}/{slug:str}/archive")
    async def archive(
        self,
        request: AnyRequest,
        state: State,
        viewer: SignedIn,
        org: OrgPath,
        kind: Kind,
        slug: FromPath[str],
    ) -> Response[Any]:
        """What `DELETE .../schema/{kind}/{slug}` does."""
        data = await request.form()
        etag = data.get("etag")
        try:
            async with transaction(state.engine) as session:
                await schema.archive_item(
                    session,
                    viewer.actor,
                    org,
                    KINDS[kind],
                    slug,
                    if_match=etag if isinstance(etag, str) else None,
                )
        except InstallServiceError as exc:
            if exc.status in (401, 404):
                raise
            async with transaction(state.engine) as session:
                return await _item_page(request, session, viewer, org, kind, slug, refused=exc)
        return after_form(f"/console/orgs/{org}/schema/{kind}/{slug}?done=archived")


async def _item_page(
    request: AnyRequest,
    session: AsyncSession,
    viewer: Viewer,
    org: str,
    kind: str,
    slug: str,
    *,
    done: str | None = None,
    form: SchemaItemForm | None = None,
    refused: InstallServiceError | None = None,
) -> Template:
    access = await orgs.resolve_org(session, viewer.actor, org)
    item = await schema.get_item(session, viewer.actor, str(access.id), KINDS[kind], slug)
    if refused is not None:
        request.state.outcome = refused.code
    return page(
        request,
        "schema_item.html.j2",
        status=refused.status if refused else 200,
        org=access,
        kind_path=kind,
        item=item,
        form=form or SchemaItemForm.of(item.kind, item.document, item.etag),
        may_edit=orgs.may_manage(viewer.actor, access) and item.status == "active",
        done=done,
        refused=refused,
    )
