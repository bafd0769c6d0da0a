"""The served OpenAPI document is good enough to generate a working client from."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL

from install_service.testing import serving
from tests.conftest import SERVER_TOKEN

PACKAGE = "install_service_generated_client"


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Any]:
    """Import the package generated into tmp_path, and forget it afterwards."""
    sys.path.insert(0, str(tmp_path / "client"))

    def load(name: str) -> Any:
        importlib.invalidate_caches()  # the package did not exist when the path was added
        return importlib.import_module(f"{PACKAGE}.{name}")

    yield load
    sys.path.remove(str(tmp_path / "client"))
    for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def test_a_generated_python_client_runs_an_install(
    install_service_database_url: URL, tmp_path: Path, generated: Any
) -> None:
    with serving(
        install_service_database_url, admin_token=SERVER_TOKEN, log=tmp_path / "serve.log"
    ) as base:
        (tmp_path / "openapi.json").write_bytes(httpx.get(f"{base}/docs/openapi.json").content)
        subprocess.run(  # noqa: S603
            [
                sys.executable,
                "-m",
                "openapi_python_client",
                "generate",
                "--path",
                str(tmp_path / "openapi.json"),
                "--output-path",
                str(tmp_path / "client" / PACKAGE),
                "--meta",
                "none",
                "--fail-on-warning",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        client = generated("client")
        models = generated("models")
        admin_api = generated("api.admin")
        installs_api = generated("api.installs")
        templates_api = generated("api.templates")
        for module in ("create_user", "create_organization", "add_member"):
            importlib.import_module(f"{admin_api.__name__}.{module}")
        for module in ("install_template", "get_install_history", "get_install_drift"):
            importlib.import_module(f"{installs_api.__name__}.{module}")
        importlib.import_module(f"{templates_api.__name__}.list_templates")

        admin = client.AuthenticatedClient(base_url=base, token=SERVER_TOKEN)
        anyone = client.Client(base_url=base)
        listed = templates_api.list_templates.sync(client=anyone)
        assert "personal-finance" in [t.slug for t in listed.items]

        user = admin_api.create_user.sync(
            client=admin, body=models.CreateUser(email="ada@example.com", name="Ada")
        )
        assert isinstance(user, models.UserCreated)
        admin_api.create_organization.sync(
            client=admin,
            body=models.CreateOrganization(slug="ada-household", name="Ada household"),
        )
        member = admin_api.add_member.sync(
            "ada-household",
            client=admin,
            body=models.AddMember(email="ada@example.com", role=models.AddMemberRole.OWNER),
        )
        assert isinstance(member, models.Member)

        ada = client.AuthenticatedClient(base_url=base, token=user.token)
        request = models.InstallRequest(
            template="personal-finance", organization="ada-household", with_requirements=True
        )
        first = installs_api.install_template.sync_detailed(client=ada, body=request)
        again = installs_api.install_template.sync_detailed(client=ada, body=request)
        assert (first.status_code, again.status_code) == (201, 200)
        installed = first.parsed
        assert isinstance(installed, models.InstallResult)
        assert (installed.created, installed.organization.slug) == (True, "ada-household")
        # Its own 17; business-core's company came with it, in an install of its own.
        assert installed.changes["entity_types"].created == 17
        assert again.parsed.id == installed.id

        history = installs_api.get_install_history.sync(installed.id, client=ada)
        assert [event.action for event in history.items] == ["install"]
        drift = installs_api.get_install_drift.sync(installed.id, client=ada)
        assert isinstance(drift, models.DriftReport)
        assert drift.drift == []

        unknown = installs_api.install_template.sync_detailed(
            client=ada, body=models.InstallRequest(template="no-such-template")
        )
        assert unknown.status_code == 404
        assert isinstance(unknown.parsed, models.Problem)
        assert unknown.parsed.code == "template_not_found"


async def test_operations_are_named_and_list_only_their_own_errors(
    install_service_client: Any,
) -> None:
    schema = (await install_service_client.get("/docs/openapi.json")).json()
    operations = {
        op["operationId"]: op
        for item in schema["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {"installTemplate", "getInstallDrift", "uninstallTemplate", "startResync"} <= set(
        operations
    )
    assert all(name[0].islower() and "_" not in name for name in operations)

    def errors(name: str) -> set[str]:
        return {status for status in operations[name]["responses"] if status >= "400"}

    assert errors("getReadiness") == {"503"}
    assert errors("getLiveness") == set()
    assert errors("getInstall") == {"401", "404", "503"}
    assert errors("listTemplates") == {"400", "401", "503"}  # limit and cursor
    assert errors("installTemplate") == {"400", "401", "403", "404", "409", "413", "422", "503"}
    assert errors("startResync") == {"400", "401", "403", "404", "409", "413", "422", "503"}
    assert set(operations["startResync"]["responses"]) >= {"200", "202"}
    for control in ("pauseResyncRun", "resumeResyncRun", "cancelResyncRun", "retryResyncRun"):
        assert errors(control) == {"401", "403", "404", "409", "503"}
    assert errors("listResyncRuns") == {"400", "401", "403", "404", "503"}
    assert errors("listResyncRunItems") == {"400", "401", "403", "404", "503"}
    assert errors("pinInstall") == {"400", "401", "403", "404", "413", "422", "503"}
    assert errors("unpinInstall") == {"401", "403", "404", "503"}
    for operation in operations.values():
        for status, response in operation["responses"].items():
            if status >= "400":
                assert list(response["content"]) == ["application/problem+json"]
    assert "security" not in operations["getReadiness"]
    assert operations["listTemplates"]["security"] == [{}, {"bearer": []}]
    assert operations["installTemplate"]["security"] == [{"bearer": []}]
