"""Hostile input, generated: schemathesis against the OpenAPI schema of the real server."""

from __future__ import annotations

import asyncio
import re
import sys

import httpx

from tests.conftest import SERVER_TOKEN


async def test_no_server_errors_and_responses_match_the_schema(server: str) -> None:
    async with httpx.AsyncClient() as client:
        schema = (await client.get(f"{server}/docs/openapi.json")).json()
    # The change feeds' long polls would hold most generated requests for up to 30 s; their
    # parameters are checked in tests/test_events.py.
    long_polls = "/events/?$"
    operations = sum(
        method in ("get", "put", "post", "patch", "delete")
        for route, path in schema["paths"].items()
        for method in path
        if not re.search(long_polls, route)
    )
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
        "30",
        "--seed",
        "20261123",
        "--request-timeout",
        "20",
        "--exclude-path-regex",
        long_polls,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    report = output.decode()
    assert process.returncode == 0, report[-6000:]
    assert f"Tested: {operations}" in report or f"{operations} passed" in report, report[-3000:]
