"""The audit log over HTTP, for platform admins."""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, get
from litestar.params import QueryParameter

from install_service.audit import service as audit
from install_service.audit.schemas import AuditPage
from install_service.deps import BEARER, PageParams, Session, User
from install_service.problems import ADMIN, problems


class AdminAuditController(Controller):
    path = "/api/v1/admin/audit"
    tags = ("admin",)
    security = BEARER

    @get(
        "/",
        operation_id="listAudit",
        summary="The audit log, newest first",
        description="Every admin action and every install lifecycle action that changed "
        "something: who, what, on what, in which request, when.",
        responses=problems(*ADMIN, 400),
    )
    async def list_audit(
        self,
        session: Session,
        admin: User,
        page: PageParams,
        action: Annotated[str | None, QueryParameter(max_length=60)] = None,
        organization_id: Annotated[uuid.UUID | None, QueryParameter()] = None,
        actor_user_id: Annotated[uuid.UUID | None, QueryParameter()] = None,
    ) -> AuditPage:
        return await audit.list_entries(
            session,
            page,
            action=action,
            organization_id=organization_id,
            actor_user_id=actor_user_id,
        )
