"""Hostile input, generated: schemathesis against the OpenAPI schema of the real server."""

from __future__ import annotations

import asyncio
import sys

from tests.conftest import SERVER_TOKEN


async def test_no_server_errors_and_responses_match_the_schema(server: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server}/docs/openapi.json",
        "--header",
        f"Authorization: Bearer {SERVER_TOKEN}",
        "--checks",
        "not_a_server_error,response_schema_conformance,status_code_conformance",
        "--max-examples",
        "25",
        "--seed",
        "20261123",
        "--request-timeout",
        "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    report = output.decode()
    assert process.returncode == 0, report[-6000:]
    assert "Tested: 21" in report or "21 passed" in report, report[-3000:]
