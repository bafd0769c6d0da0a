"""Logs and metrics: one JSON line format for everything a server says, request ids on every
response, metrics by route template, and gauges of the pool, the job queue and resync runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.config import Settings
from install_service.testing import bearer, make_user, publish_template, serving
from tests.conftest import SERVER_TOKEN, small_doc

Client = AsyncTestClient[Litestar]


class TestLogs:
    def test_every_line_is_json_and_every_request_is_logged_with_its_id(
        self, install_service_database_url: URL, tmp_path: Path
    ) -> None:
        log = tmp_path / "serve.log"
        admin = bearer(SERVER_TOKEN)
        with serving(install_service_database_url, admin_token=SERVER_TOKEN, log=log) as base:
            user = httpx.post(
                f"{base}/api/v1/admin/users", json={"email": "ada@example.com"}, headers=admin
            ).json()
            installed = httpx.post(
                f"{base}/api/v1/installs",
                json={"template": "personal-finance", "with_requirements": True},
                headers=bearer(user["token"]),
            )
            unrouted = httpx.get(f"{base}/no/such/route", headers={"X-Request-ID": "given-1"})
            generated = httpx.get(f"{base}/also/unrouted")
            # A NUL in a filter reaches the database, which refuses it: a 422, and a warning
            # logged while the request is handled.
            refused = httpx.get(
                f"{base}/api/v1/admin/audit",
                params={"action": "a\u0000b"},
                headers={**admin, "X-Request-ID": "given-2"},
            )
        assert installed.status_code == 201
        assert (unrouted.status_code, unrouted.headers["x-request-id"]) == (404, "given-1")
        assert unrouted.json()["request_id"] == "given-1"
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_value")

        lines = [json.loads(line) for line in log.read_text().splitlines()]
        for line in lines:
            assert {"time", "level", "event", "logger"} <= set(line), line
        events = [line["event"] for line in lines]
        assert "migrations applied" in events
        assert "serving" in events
        assert "Application startup complete." in events  # uvicorn's own
        assert any(line["logger"].startswith("procrastinate") for line in lines)

        requests = {line["request_id"]: line for line in lines if line["event"] == "request"}
        assert requests["given-1"] | {"duration_ms": 0} == requests["given-1"] | {
            "method": "GET",
            "path": "/no/such/route",
            "route": None,
            "status": 404,
            "outcome": "not_found",
            "duration_ms": 0,
        }
        assert requests[generated.headers["x-request-id"]]["path"] == "/also/unrouted"
        install = requests[installed.headers["x-request-id"]]
        assert (install["route"], install["status"], install["outcome"]) == (
            "/api/v1/installs",
            201,
            "install",
        )
        assert (install["user"], install["template"]) == (user["id"], "personal-finance")
        assert install["org"] == user["personal_organization"]["slug"]
        warnings = [line for line in lines if line["event"] == "data exception"]
        assert [w["request_id"] for w in warnings] == ["given-2"]


class TestMetrics:
    async def test_request_series_are_labelled_by_route_template(
        self, engine: AsyncEngine, install_service_client: Client
    ) -> None:
        client = install_service_client
        await publish_template(engine, small_doc())
        _, _, token = await make_user(engine)
        installed = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        install_id = installed.json()["id"]
        history = await client.get(f"/api/v1/installs/{install_id}/history", headers=bearer(token))
        assert history.status_code == 200

        metrics = (await client.get("/metrics")).text
        assert 'path="/api/v1/installs/{install_id}/history"' in metrics
        assert install_id not in metrics
        assert 'install_service_installs_total{action="install",outcome="ok"}' in metrics

    async def test_gauges_show_the_pool_the_queue_and_resync_progress(
        self, engine: AsyncEngine, install_service_client: Client
    ) -> None:
        client = install_service_client
        await publish_template(engine, small_doc())
        for _ in range(3):
            _, _, token = await make_user(engine)
            await client.post(
                "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
            )
        _, _, admin_token = await make_user(engine, admin=True)
        # No worker runs in this app: the run stays queued with its jobs waiting.
        run = await client.post(
            "/api/v1/admin/templates/starter/resync", json={}, headers=bearer(admin_token)
        )
        assert run.status_code == 202

        metrics = (await client.get("/metrics")).text
        pool_size = Settings.from_env().db_pool_size  # the app is built from the environment
        assert f"install_service_db_pool_size {float(pool_size)}" in metrics
        assert re.search(r"^install_service_db_pool_checked_out \d", metrics, re.M)
        assert 'install_service_resync_runs_in_progress{status="queued"} 1.0' in metrics
        assert "install_service_resync_items_pending 3.0" in metrics
        assert 'install_service_jobs{status="todo"} 4.0' in metrics

    async def test_the_metrics_document_is_plain_text(self, install_service_client: Client) -> None:
        response = await install_service_client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        schema = (await install_service_client.get("/docs/openapi.json")).json()
        documented = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert [media.split(";")[0] for media in documented] == ["text/plain"]
