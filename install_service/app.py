"""The Litestar application: routes, dependencies, problem+json errors, logs, metrics, docs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import structlog
from litestar import Litestar, Request, Response, get
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import URL

from install_service import context, deps
from install_service.audit.api import AdminAuditController
from install_service.config import Settings
from install_service.console import ConsolePlugin
from install_service.db.engine import async_url, asyncpg_dsn, create_engine, resolve_database_url
from install_service.db.migrate import head_revision
from install_service.errors import Conflict, InstallServiceError, Invalid, Unavailable, in_words
from install_service.events.api import (
    AdminEventsController,
    AdminWebhooksController,
    OrganizationEventsController,
)
from install_service.events.listener import Listener
from install_service.installs.api import InstallsController, OrganizationInstallsController
from install_service.logs import get_logger
from install_service.metrics import MetricsController, http_metrics
from install_service.orgs.api import AdminOrgsController, MeController, OrgMembersController
from install_service.problems import problems
from install_service.resync import jobs
from install_service.resync.api import AdminResyncController
from install_service.schema.api import OrganizationSchemaController
from install_service.templates.api import AdminTemplatesController, TemplatesController
from install_service.watchers.api import OrganizationWatchersController

log = get_logger("install_service.request")
error_log = get_logger("install_service.errors")

# Request bodies above this are refused with 413 before they are read.
MAX_BODY_BYTES = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def problem(
    request: Request[Any, Any, Any],
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response[dict[str, Any]]:
    """An RFC 9457 problem+json response with the service's stable machine `code`."""
    body = {
        "type": f"urn:install-service:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.url.path,
        **extra,
    }
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    return Response(
        body, status_code=status, media_type="application/problem+json", headers=headers
    )


def _domain_error(request: Request[Any, Any, Any], exc: InstallServiceError) -> Response[Any]:
    request.state.outcome = exc.code
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return problem(
        request,
        status=exc.status,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        headers=headers,
        **exc.extra,
    )


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error")
    request.state.outcome = code
    extra: dict[str, Any] = {}
    if status == 400 and isinstance(exc.extra, list):
        extra["errors"] = [
            {**e, "message": in_words(e["message"])}
            if isinstance(e, dict) and isinstance(e.get("message"), str)
            else e
            for e in exc.extra
        ]
    if status == 413:
        detail = f"request bodies are limited to {MAX_BODY_BYTES} bytes"
    else:
        detail = exc.detail
    return problem(
        request,
        status=status,
        code=code,
        title=exc.detail if status >= 500 else _title(status),
        detail=detail,
        headers=exc.headers,
        **extra,
    )


def _title(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


_UNAVAILABLE = (OSError, TimeoutError, sa_exc.TimeoutError, sa_exc.OperationalError)


# Deadlock and serialization failures: the transaction was rolled back whole; retry is safe.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(exc, sa_exc.DBAPIError) and sqlstate in _RETRYABLE_SQLSTATES:
        return _domain_error(
            request,
            Conflict(
                "a concurrent change got in the way; nothing was written, retry",
                code="concurrent_change",
            ),
        )
    if isinstance(exc, sa_exc.DBAPIError) and isinstance(sqlstate, str) and sqlstate[:2] == "22":
        # A data exception is bad input that slipped past validation: say so, and log it.
        error_log.warning(
            "data exception", method=request.method, path=request.url.path, error=str(exc)
        )
        return _domain_error(
            request, Invalid("a value is out of range or malformed", code="invalid_value")
        )
    # Connection exceptions (08xxx) and shutdowns / not yet accepting connections (57P0x).
    shutting_down = isinstance(sqlstate, str) and sqlstate.startswith(("08", "57P"))
    if (
        isinstance(exc, _UNAVAILABLE)
        or shutting_down
        or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)
    ):
        error_log.warning("database unavailable", error=str(exc))
        return _domain_error(request, Unavailable("the database is unavailable; try again shortly"))
    error_log.exception("unhandled error", method=request.method, path=request.url.path)
    request.state.outcome = "internal_error"
    return problem(
        request,
        status=500,
        code="internal_error",
        title="Internal server error",
        detail="an unexpected error occurred; it has been logged",
    )


class RequestLog:
    """Wraps the whole application, router included: every request (one that matches no route
    too) gets an `X-Request-ID` and one log line, and every line logged while it is handled
    carries its `request_id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        context.request_id.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)["x-request-id"] = request_id
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "request",
                    method=scope.get("method"),
                    path=scope["path"],
                    route=scope.get("path_template"),
                    status=status,
                    user=state.get("user_id"),
                    org=state.get("org"),
                    template=state.get("template"),
                    outcome=state.get("outcome") or ("ok" if status < 400 else "error"),
                    duration_ms=round((time.perf_counter() - start) * 1000, 2),
                )


@get("/healthz", tags=["health"], operation_id="getLiveness", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    tags=["health"],
    operation_id="getReadiness",
    summary="Readiness: database reachable, migrations at head",
    responses=problems(503),
)
async def readyz(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    try:
        async with state.engine.connect() as conn:
            current = await asyncio.wait_for(
                conn.scalar(text("SELECT version_num FROM alembic_version")), timeout=5
            )
    except Exception as exc:
        return problem(
            request,
            status=503,
            code="database_unavailable",
            title="Service unavailable",
            detail=f"database not reachable: {type(exc).__name__}",
        )
    if current != state.head_revision:
        return problem(
            request,
            status=503,
            code="migrations_pending",
            title="Service unavailable",
            detail=f"database at {current}, code expects {state.head_revision}",
        )
    return Response({"status": "ready", "migration": current})


def _swagger_assets() -> str:
    return str(importlib.resources.files("swagger_ui") / "static")


def create_app(
    database_url: URL | str | Callable[[], URL | str] | None = None,
    *,
    settings: Settings | None = None,
    worker: bool = False,
) -> Litestar:
    """The HTTP application, bound to its database each time it starts: `database_url`, or
    what a function given as `database_url` returns then (the test harness starts one app on
    one test's database after another: building an app costs far more than starting one),
    or, without it, INSTALL_SERVICE_DATABASE_URL or the embedded server. `settings` are read
    from the environment at each start unless given. With `worker`, a resync worker runs in
    the same process."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        current = settings or Settings.from_env()
        url: URL | str
        if database_url is None:
            url = await anyio.to_thread.run_sync(resolve_database_url, current)
        elif callable(database_url):
            url = database_url()
        else:
            url = database_url
        app.state.engine = create_engine(url, pool_size=current.db_pool_size, max_overflow=0)
        app.state.head_revision = head_revision()
        app.state.settings = current
        # One connection outside the pool wakes every long-polling feed reader.
        app.state.listener = Listener(asyncpg_dsn(url))
        await app.state.listener.start()
        background: asyncio.Task[None] | None = None
        stopping = asyncio.Event()
        try:
            async with jobs.opened(async_url(url)) as queue:
                app.state.jobs = queue
                if worker:
                    background = asyncio.create_task(
                        jobs.keep_working(app.state.engine, app.state.jobs, stopping)
                    )
                yield
                if background is not None:
                    stopping.set()
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
        finally:
            await app.state.listener.stop()
            await app.state.engine.dispose()

    assets = "/docs/assets"
    app = Litestar(
        route_handlers=[
            healthz,
            readyz,
            TemplatesController,
            AdminTemplatesController,
            InstallsController,
            OrganizationInstallsController,
            AdminOrgsController,
            MeController,
            OrgMembersController,
            AdminAuditController,
            AdminResyncController,
            OrganizationEventsController,
            AdminEventsController,
            AdminWebhooksController,
            OrganizationWatchersController,
            OrganizationSchemaController,
            MetricsController,
            create_static_files_router(path=assets, directories=[_swagger_assets()]),
        ],
        dependencies={
            "session": Provide(deps.provide_session),
            "actor": Provide(deps.provide_actor),
            "user": Provide(deps.provide_user),
            "admin": Provide(deps.provide_admin),
            "page": Provide(deps.provide_page),
        },
        before_request=deps.authenticate,
        request_class=deps.ServiceRequest,
        exception_handlers={
            InstallServiceError: _domain_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        middleware=[http_metrics().middleware],
        lifespan=[lifespan],
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,
        # The console at /console: its own router, templates, sessions and CSRF.
        plugins=[ConsolePlugin()],
        openapi_config=OpenAPIConfig(
            title="install-service",
            version="1",
            description="Installs curated schema templates into organizations and keeps "
            "them in sync. Errors are RFC 9457 problem+json with a stable `code`.",
            path="/docs",
            render_plugins=[
                SwaggerRenderPlugin(
                    path="/",
                    js_url=f"{assets}/swagger-ui-bundle.js",
                    css_url=f"{assets}/swagger-ui.css",
                    standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
                    favicon=f'<link rel="icon" href="{assets}/favicon-32x32.png">',
                )
            ],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description="API token")
                }
            ),
        ),
    )
    # Around the router, not per route, so requests that match no route are logged too.
    app.asgi_handler = RequestLog(app.asgi_handler)
    return app
