"""HTTP endpoints for an organization's own schema: read, create, edit (JSON merge patch with
`If-Match`) and archive its entity types, relationship types, classifiers and watchers."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import ResponseHeader
from litestar.params import Body, HeaderParameter, JSONBody, PathParameter, QueryParameter

from install_service.deps import BEARER, OrgPath, PageParams, Session, User
from install_service.problems import SIGNED_IN, WITH_BODY, problems
from install_service.schema import service
from install_service.schema.schemas import KINDS, KindPath, SchemaItem, SchemaItemPage, Status

Kind = Annotated[
    KindPath,
    PathParameter(description="entity-types, relationship-types, classifiers or watchers"),
]
Slug = Annotated[str, PathParameter(description="The item's slug")]
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        max_length=10_000,
        description="The item's ETag as last read: the write is refused (412) if the item "
        "changed since.",
    ),
]
_ETAG = [
    ResponseHeader(
        name="ETag",
        description="The item's content hash; send it back as If-Match.",
        documentation_only=True,
    )
]


def _answer(request: Request[Any, Any, Any], item: SchemaItem, status: int = 200) -> Response[Any]:
    request.state.org = request.path_params.get("org")
    return Response(item, status_code=status, headers={"ETag": f'"{item.etag}"'})


class OrganizationSchemaController(Controller):
    path = "/api/v1/organizations/{org:str}/schema/{kind:str}"
    tags = ("schema",)
    security = BEARER

    @get(
        "/",
        operation_id="listSchemaItems",
        summary="An organization's items of one kind, in their template-document shape",
        description="Members read. Each item carries its `status`, its `provenance` (`own`, "
        "`managed` by a template's install and the release it mirrors, or `detached`), "
        "whether a managed item differs from what was mirrored (`edited`) and its `etag`.",
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def list_items(
        self,
        session: Session,
        user: User,
        org: OrgPath,
        kind: Kind,
        page: PageParams,
        status: Annotated[Status | None, QueryParameter(description="Only these items.")] = None,
        template: Annotated[
            str | None,
            QueryParameter(
                max_length=100,
                description="Only items managed by or detached from this template.",
            ),
        ] = None,
    ) -> SchemaItemPage:
        return await service.list_items(
            session, user, org, KINDS[kind], page, status=status, template=template
        )

    @post(
        "/",
        operation_id="createSchemaItem",
        summary="Author an item in the organization",
        description="The body is the item as a template document writes it; it is validated "
        "the same way (422 lists every problem) and its references must resolve among the "
        "organization's active items. A slug the organization already has, in any status "
        "and from any source, is a 409. Owners and admins.",
        status_code=201,
        response_headers=_ETAG,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404, 409, 422),
    )
    async def create_item(
        self,
        request: Request[Any, Any, Any],
        session: Session,
        user: User,
        org: OrgPath,
        kind: Kind,
        data: JSONBody[dict[str, Any]],
    ) -> Response[SchemaItem]:
        written = await service.create_item(session, user, org, KINDS[kind], data)
        return _answer(request, written.item, 201)

    @get(
        "/{slug:str}",
        operation_id="getSchemaItem",
        summary="One item of the organization, with its ETag",
        response_headers=_ETAG,
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def get_item(
        self,
        request: Request[Any, Any, Any],
        session: Session,
        user: User,
        org: OrgPath,
        kind: Kind,
        slug: Slug,
    ) -> Response[SchemaItem]:
        return _answer(request, await service.get_item(session, user, org, KINDS[kind], slug))

    @patch(
        "/{slug:str}",
        operation_id="updateSchemaItem",
        summary="Edit an item with a JSON merge patch (RFC 7396) of its document",
        description="`null` removes a field (its default then applies); objects merge key by "
        "key; anything else replaces. The result is validated as a template document's item "
        "(422 lists every problem). A watcher's or classifier's changed content appends a "
        "version; a schedule change sets the watcher's next run again. An edit of a managed "
        "item is a local edit: drift shows it and upgrades merge it. An edit that changes "
        "nothing writes nothing. Owners and admins.",
        response_headers=_ETAG,
        responses=problems(*SIGNED_IN, *WITH_BODY, 403, 404, 409, 412, 422),
    )
    async def update_item(
        self,
        request: Request[Any, Any, Any],
        session: Session,
        user: User,
        org: OrgPath,
        kind: Kind,
        slug: Slug,
        data: Annotated[dict[str, Any], Body(media_type="application/merge-patch+json")],
        if_match: IfMatch = None,
    ) -> Response[SchemaItem]:
        written = await service.update_item(
            session, user, org, KINDS[kind], slug, data, if_match=if_match
        )
        return _answer(request, written.item)

    @delete(
        "/{slug:str}",
        operation_id="archiveSchemaItem",
        summary="Archive one of the organization's own items: it keeps its slug and versions",
        description="An item a template's install manages is a 409 `item_managed` (detach it "
        "from the install first), and so is an item other active items refer to "
        "(`item_in_use`, naming them). Owners and admins.",
        status_code=200,
        response_headers=_ETAG,
        responses=problems(*SIGNED_IN, 400, 403, 404, 409, 412),
    )
    async def archive_item(
        self,
        request: Request[Any, Any, Any],
        session: Session,
        user: User,
        org: OrgPath,
        kind: Kind,
        slug: Slug,
        if_match: IfMatch = None,
    ) -> Response[SchemaItem]:
        written = await service.archive_item(
            session, user, org, KINDS[kind], slug, if_match=if_match
        )
        return _answer(request, written.item)
