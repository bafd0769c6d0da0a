"""Sample data for a first look at the console: organizations with a template installed, some
of them edited, and a new release that merges cleanly into some and conflicts in others.

Everything goes through the same service functions as the API and the CLI (users, orgs,
publish, install, tokens); only the organizations' own edits, which in real life come from
the system that owns those rows, are written directly. Running it again changes nothing that
exists: taken slugs are kept, installs are not repeated, edits are re-applied as they were.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import SYSTEM
from install_service.errors import Conflict, NotFound
from install_service.installs import service as installs
from install_service.orgs import service as orgs
from install_service.orgs import tokens
from install_service.pagination import MAX_LIMIT, PageRequest
from install_service.releases import get_release
from install_service.templates import service as templates
from install_service.templates.documents import parse

TEMPLATE = "demo-crm"
OWNER_EMAIL = "owner@demo.example"
# What each organization's users did to their copy before the new release.
Edit = Literal["none", "merges", "conflicts"]
ORGS: list[tuple[str, Edit]] = [
    *((f"demo-org-{n:02}", "none") for n in range(1, 5)),
    *((f"demo-org-{n:02}", "merges") for n in range(5, 9)),
    *((f"demo-org-{n:02}", "conflicts") for n in range(9, 13)),
]
# A third of the orgs conflict: whichever ten installs the console's default first wave takes,
# at least two of them conflict, above its default threshold of one in ten, so a staged
# resync of the demo halts after its first wave, and resuming it moves the rest.
# The demo owner owns one org of each kind; the platform admin sees all of them.
OWNED = {"demo-org-01", "demo-org-05", "demo-org-10"}

_V1: dict[str, Any] = {
    "slug": TEMPLATE,
    "name": "Demo CRM",
    "description": "Accounts, contacts and deals: a small template for a first look.",
    "entity_types": [
        {
            "slug": "account",
            "name": "Account",
            "description": "A customer account",
            "metadata_schema": {
                "type": "object",
                "properties": {"tier": {"type": "string", "description": "Plan tier"}},
            },
        },
        {"slug": "contact", "name": "Contact", "description": "A person at an account"},
        {"slug": "deal", "name": "Deal", "description": "Something we hope to sell"},
    ],
    "relationship_types": [
        {
            "slug": "works_at",
            "name": "Works at",
            "rules": [{"source": "contact", "target": "account"}],
        },
        {
            "slug": "for_account",
            "name": "For account",
            "rules": [{"source": "deal", "target": "account"}],
        },
    ],
}


def _v2() -> dict[str, Any]:
    """Release 2: renames deals, rewords accounts, adds tickets."""
    doc = copy.deepcopy(_V1)
    account, _contact, deal = doc["entity_types"]
    account["description"] = "A paying customer account"
    deal["name"] = "Opportunity"
    doc["entity_types"].append(
        {"slug": "ticket", "name": "Ticket", "description": "A support request from an account"}
    )
    return doc


# The orgs' own edits: `merges` changes a path release 2 leaves alone (an account's tier
# description), `conflicts` renames deals differently from release 2.
_EDITS: dict[Edit, str] = {
    "none": "",
    "merges": """
        UPDATE entity_types SET updated_at = now(), metadata_schema = jsonb_set(
            metadata_schema, '{properties,tier,description}', '"Support plan tier"')
        WHERE organization_id = :org AND slug = 'account'
          AND metadata_schema #>> '{properties,tier,description}' <> 'Support plan tier'""",
    "conflicts": """
        UPDATE entity_types SET updated_at = now(), name = 'Pipeline deal'
        WHERE organization_id = :org AND slug = 'deal' AND name <> 'Pipeline deal'""",
}


class DemoOrg(msgspec.Struct, kw_only=True):
    slug: str
    created: bool
    installed: bool
    edit: Edit
    owned_by_demo_owner: bool


class DemoResult(msgspec.Struct, kw_only=True):
    template: str
    latest_version: int
    organizations: list[DemoOrg]
    owner_email: str
    # A new token for the demo owner (shown once; only its hash is stored).
    owner_token: str


async def create(session: AsyncSession) -> DemoResult:
    """Make (or find) the demo's template, owner, organizations, installs and edits, then
    publish release 2 (unless the template already has it)."""
    try:
        await get_release(session, SYSTEM, TEMPLATE)
    except NotFound:
        await templates.publish(session, parse(_V1), actor=SYSTEM, source="cli", notes="demo")
    try:
        owner = await orgs.create_user(session, email=OWNER_EMAIL, name="Demo owner")
        owner_id, owner_token = owner.id, owner.token
    except Conflict:
        found = await orgs.resolve_user(session, OWNER_EMAIL)
        issued = await tokens.issue_token(session, user_id=found.id, name="demo")
        owner_id, owner_token = found.id, issued.token

    made = []
    for slug, edit in ORGS:
        try:
            org_id = (
                await orgs.create_organization(
                    session,
                    slug=slug,
                    name=f"Demo organization {slug[-2:]}",
                    owner_id=owner_id if slug in OWNED else None,
                )
            ).id
            created = True
        except Conflict:
            org_id = (await orgs.resolve_org(session, SYSTEM, slug)).id
            created = False
        listed = await installs.list_installs(
            session, SYSTEM, str(org_id), PageRequest(limit=MAX_LIMIT)
        )
        installed = False
        if not any(i.template.slug == TEMPLATE for i in listed.items):
            await installs.install(session, SYSTEM, template=TEMPLATE, organization=slug, version=1)
            installed = True
        if _EDITS[edit]:
            await session.execute(text(_EDITS[edit]), {"org": org_id})
        made.append(
            DemoOrg(
                slug=slug,
                created=created,
                installed=installed,
                edit=edit,
                owned_by_demo_owner=slug in OWNED,
            )
        )
    latest = await get_release(session, SYSTEM, TEMPLATE)
    if latest["version"] == 1:
        notes = "demo: deals become opportunities"
        await templates.publish(session, parse(_v2()), actor=SYSTEM, source="cli", notes=notes)
    return DemoResult(
        template=TEMPLATE,
        latest_version=(await get_release(session, SYSTEM, TEMPLATE))["version"],
        organizations=made,
        owner_email=OWNER_EMAIL,
        owner_token=owner_token,
    )
