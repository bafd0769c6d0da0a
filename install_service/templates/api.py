"""HTTP endpoints for templates and releases; publishing is an admin endpoint."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, PathParameter, QueryParameter

from install_service.actor import Actor
from install_service.deps import BEARER, OPTIONAL_BEARER, MaybeActor, PageParams, Session, User
from install_service.errors import Invalid
from install_service.problems import ADMIN, WITH_BODY, NoBadRequest, problems
from install_service.templates import documents
from install_service.templates import service as templates
from install_service.templates.schemas import (
    PublishResult,
    Release,
    ReleaseDiff,
    ReleasePage,
    TemplateManifest,
    TemplatePage,
)

_ANONYMOUS = Actor(user_id=None)
ReleaseVersion = Annotated[int, PathParameter(ge=1, le=2_147_483_647)]


class TemplatesController(Controller):
    path = "/api/v1/templates"
    tags = ("templates",)
    security = OPTIONAL_BEARER

    @get(
        "/",
        operation_id="listTemplates",
        summary="List templates",
        description="Public templates, and private templates "
        "of organizations the caller belongs to.",
        responses=problems(400, 401, 503),
    )
    async def list_templates(
        self, session: Session, actor: MaybeActor, page: PageParams
    ) -> TemplatePage:
        return await templates.list_templates(session, actor or _ANONYMOUS, page)

    @get(
        "/{slug:str}",
        operation_id="getTemplate",
        operation_class=NoBadRequest,
        summary="Template manifest",
        responses=problems(401, 404, 503),
    )
    async def get_template(
        self, session: Session, actor: MaybeActor, slug: FromPath[str]
    ) -> TemplateManifest:
        return await templates.manifest(session, actor or _ANONYMOUS, slug)

    @get(
        "/{slug:str}/releases",
        operation_id="listReleases",
        summary="List a template's releases",
        responses=problems(400, 401, 404, 503),
    )
    async def list_releases(
        self, session: Session, actor: MaybeActor, slug: FromPath[str], page: PageParams
    ) -> ReleasePage:
        return await templates.list_releases(session, actor or _ANONYMOUS, slug, page)

    @get(
        "/{slug:str}/releases/{version:int}",
        operation_id="getRelease",
        summary="One release with its snapshot",
        responses=problems(400, 401, 404, 503),
    )
    async def get_release(
        self, session: Session, actor: MaybeActor, slug: FromPath[str], version: ReleaseVersion
    ) -> Release:
        return await templates.release(session, actor or _ANONYMOUS, slug, version)

    @get(
        "/{slug:str}/releases/{from_version:int}/diff/{to_version:int}",
        operation_id="diffReleases",
        summary="What changed between two releases, item by item and path by path",
        responses=problems(400, 401, 404, 503),
    )
    async def diff_releases(
        self,
        session: Session,
        actor: MaybeActor,
        slug: FromPath[str],
        from_version: ReleaseVersion,
        to_version: ReleaseVersion,
    ) -> ReleaseDiff:
        return await templates.release_diff(
            session, actor or _ANONYMOUS, slug, from_version, to_version
        )


class AdminTemplatesController(Controller):
    path = "/api/v1/admin/templates"
    tags = ("admin",)
    security = BEARER

    @put(
        "/{slug:str}",
        operation_id="publishTemplate",
        summary="Publish a template document",
        description="Applies the document to the template organization and cuts release N+1. "
        "201 when a release was cut, 200 when the content was unchanged. An invalid document "
        "is a 422 listing every problem; nothing is written.",
        status_code=200,
        responses={
            **problems(*ADMIN, *WITH_BODY, 409, 422),
            201: ResponseSpec(PublishResult, description="A new release was cut"),
        },
    )
    async def publish(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        admin: User,
        slug: FromPath[str],
        data: JSONBody[dict[str, Any]],
        notes: Annotated[str, QueryParameter(max_length=2000)] = "",
    ) -> Response[PublishResult]:
        data.setdefault("slug", slug)
        if data["slug"] != slug:
            raise Invalid(
                f"the document's slug {data['slug']!r} does not match the URL's {slug!r}",
                code="slug_mismatch",
            )
        request.state.template = slug
        document = documents.parse(data)
        result = await templates.publish(session, document, actor=admin, source="api", notes=notes)
        return Response(result, status_code=201 if result.created else 200)
