"""Load with invariants: 1,200 mixed operations from 32 clients against the real server."""

from __future__ import annotations

import asyncio
import copy
import random
from collections import Counter
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.testing import bearer, make_user, publish_template
from tests.conftest import SERVER_TOKEN, rows, small_doc

OPERATIONS = 1_200
CLIENTS = 32
ORGS = 200
VERSION_HASHES = """
    SELECT 'w' || id, md5(to_jsonb(v)::text) FROM watcher_versions v
    UNION ALL SELECT 'c' || id, md5(to_jsonb(v)::text) FROM event_classifier_versions v
    UNION ALL SELECT 'r' || id, md5(to_jsonb(v)::text) FROM template_releases v"""


def release(n: int) -> dict[str, Any]:
    doc = copy.deepcopy(small_doc())
    doc["watchers"][0]["prompt"] = f"Find people and companies (release {n})."
    if n % 2 == 0:  # every other release adds an item, so upgrades also create and archive
        doc["entity_types"].append({"slug": "project", "name": f"Project {n}"})
    return doc


class TestLoad:
    async def test_mixed_operations_under_load_keep_every_invariant(
        self, engine: AsyncEngine, server: str
    ) -> None:
        rng = random.Random(20261123)  # noqa: S311 (reproducible load, not security)
        await publish_template(engine, release(1))
        tokens = [(await make_user(engine))[2] for _ in range(ORGS)]
        installs: dict[int, str] = {}
        statuses: Counter[int] = Counter()
        published = [1]

        async def operate(client: httpx.AsyncClient, n: int) -> None:
            org = rng.randrange(ORGS)
            auth = bearer(tokens[org])
            kind = rng.choice(["install", "install", "upgrade", "rollback", "uninstall", "dry"])
            if kind == "uninstall" and org in installs:
                response = await client.delete(f"/api/v1/installs/{installs[org]}", headers=auth)
            else:
                body: dict[str, Any] = {"template": "starter"}
                if kind == "rollback":
                    body["version"] = rng.choice(published)
                elif kind == "dry":
                    body["dry_run"] = True
                response = await client.post("/api/v1/installs", json=body, headers=auth)
                if response.status_code in (200, 201) and not body.get("dry_run"):
                    installs[org] = response.json()["id"]
            statuses[response.status_code] += 1

        async def clients(client: httpx.AsyncClient, count: int) -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for n in range(count):
                queue.put_nowait(n)

            async def worker() -> None:
                while not queue.empty():
                    await operate(client, queue.get_nowait())

            await asyncio.gather(*(worker() for _ in range(CLIENTS)))

        async def publisher(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
            n = 1
            while not stop.is_set() and n < 30:
                n += 1
                response = await client.put(
                    "/api/v1/admin/templates/starter", json=release(n), headers=bearer(SERVER_TOKEN)
                )
                statuses[response.status_code] += 1
                published.append(response.json()["version"])
                await asyncio.sleep(0.3)

        limits = httpx.Limits(max_connections=CLIENTS + 1)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            stop = asyncio.Event()
            publishing = asyncio.create_task(publisher(client, stop))
            await clients(client, OPERATIONS // 2)
            halfway = dict(await rows(engine, VERSION_HASHES))
            await clients(client, OPERATIONS // 2)
            stop.set()
            await publishing

        assert sum(statuses.values()) >= OPERATIONS
        assert not [code for code in statuses if code >= 500], statuses
        assert set(statuses) <= {200, 201, 409}, statuses
        assert len(published) > 3
        after = dict(await rows(engine, VERSION_HASHES))
        assert {key: after.get(key) for key in halfway} == halfway
        # The invariant checker runs when the `engine` fixture closes.
