"""The audit log, for platform admins."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.params import QueryParameter
from litestar.response import Template

from install_service.audit import service as audit
from install_service.console.pages.common import AnyRequest, Cursor, SignedIn, page_of
from install_service.console.render import page
from install_service.deps import Session


class AuditPages(Controller):
    path = "/audit"

    @get("/", name="console:audit")
    async def audit_log(
        self,
        request: AnyRequest,
        session: Session,
        admin: SignedIn,
        cursor: Cursor = None,
        action: Annotated[str | None, QueryParameter(max_length=60)] = None,
    ) -> Template:
        entries = await audit.list_entries(session, page_of(cursor), action=action or None)
        return page(request, "audit.html.j2", entries=entries, action=action or "")
