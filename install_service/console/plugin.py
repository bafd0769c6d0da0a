"""The console as a Litestar plugin: its router (pages, static assets, CSRF, sessions, error
pages), its Jinja2 templates, and the CSRF key loaded from the database at start-up."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jinja2
from litestar import Litestar, Router, get
from litestar.config.app import AppConfig
from litestar.config.csrf import CSRFConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.params import FromPath
from litestar.plugins import InitPluginProtocol
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from install_service import textdiff
from install_service.console import auth, render
from install_service.console.pages import (
    AuditPages,
    OrgPages,
    RunPages,
    SchemaPages,
    SessionPages,
    TemplatePages,
)
from install_service.errors import InstallServiceError, NotFound
from install_service.orgs import sessions

HERE = Path(__file__).parent


@get("/{path:path}", opt={"public": True}, name="console:not-found")
async def not_found(path: FromPath[str]) -> None:
    """Any other console address: the console's 404 page."""
    raise NotFound(f"there is no console page at /console{path}", code="not_found")


def _pretty(value: Any) -> str:
    """A JSON value as people read it (keys in order, indented)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty"] = _pretty
    env.filters["line_kind"] = textdiff.line_kind
    return env


class ConsolePlugin(InitPluginProtocol):
    """Adds `/console` to an app whose state has the service's `engine` and `jobs`."""

    def __init__(self) -> None:
        # Replaced at start-up by the key every replica shares (see `sessions.csrf_secret`).
        self.csrf = CSRFConfig(
            secret=secrets.token_hex(32),
            cookie_name=auth.CSRF_COOKIE,
            cookie_path=auth.PREFIX,
            cookie_httponly=True,
            cookie_samesite="strict",
            header_name="x-csrftoken",
        )

    @asynccontextmanager
    async def _load_csrf_secret(self, app: Litestar) -> AsyncIterator[None]:
        async with app.state.engine.connect() as conn:
            self.csrf.secret = await sessions.csrf_secret(conn)
        yield

    def router(self) -> Router:
        return Router(
            path=auth.PREFIX,
            route_handlers=[
                SessionPages,
                TemplatePages,
                OrgPages,
                SchemaPages,
                RunPages,
                AuditPages,
                create_static_files_router(
                    path="/static", directories=[HERE / "static"], opt={"public": True}
                ),
                not_found,
            ],
            dependencies={
                "viewer": Provide(auth.provide_viewer),
                "admin": Provide(auth.provide_platform_admin),
            },
            before_request=auth.authenticate,
            middleware=[DefineMiddleware(CSRFMiddleware, config=self.csrf)],
            exception_handlers={
                InstallServiceError: render.domain_error,
                HTTPException: render.http_error,
            },
            response_headers=render.SECURITY_HEADERS,
            include_in_schema=False,
        )

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(self.router())
        app_config.template_config = TemplateConfig(
            instance=JinjaTemplateEngine.from_environment(_environment()),
        )
        app_config.lifespan.append(self._load_csrf_secret)
        return app_config
