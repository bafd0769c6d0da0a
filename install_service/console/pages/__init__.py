"""Console pages, one module per domain like the API's controllers: each handler calls the
same service functions as the API and the CLI, and renders their results."""

from install_service.console.pages.audit import AuditPages
from install_service.console.pages.orgs import OrgPages
from install_service.console.pages.runs import RunPages
from install_service.console.pages.schema import SchemaPages
from install_service.console.pages.session import SessionPages
from install_service.console.pages.templates import TemplatePages

__all__ = ["AuditPages", "OrgPages", "RunPages", "SchemaPages", "SessionPages", "TemplatePages"]
