"""Reading releases: which templates a caller may see, and one release of one of them.

Both publishing (templates) and installing (installs) read releases; this lower module is the
one place they come from, so neither domain imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.errors import NotFound

TEMPLATES = "organizations o JOIN agents a ON a.organization_id = o.id AND a.is_template"
# Public templates, or private ones the actor is a member of the template org of.
VISIBLE = """(o.visibility = 'public' OR :admin OR EXISTS (
    SELECT 1 FROM memberships m
    WHERE m.organization_id = o.id AND m.user_id = CAST(:actor AS uuid)))"""


def visibility_params(actor: Actor) -> dict[str, Any]:
    return {"admin": actor.is_platform_admin, "actor": actor.user_id}


# One release (the latest, or `:version`) of the template `:slug`, if the actor can see it;
# `id` is NULL when the template has no such release.
# The requirements of release `{release}`: each template, the minimum version, and the
# version the release was checked against when it was published (contract §13).
REQUIRES = """(
    SELECT coalesce(jsonb_agg(jsonb_build_object('template', q.slug,
                                                 'version', rr.min_version,
                                                 'checked_version', cr.version)
                              ORDER BY q.slug), '[]'::jsonb)
    FROM template_release_requirements rr
    JOIN agents qa ON qa.id = rr.required_template_agent_id
    JOIN organizations q ON q.id = qa.organization_id
    JOIN template_releases cr ON cr.id = rr.checked_release_id
    WHERE rr.release_id = {release})"""

RELEASE_SQL = f"""
                SELECT o.slug AS template, o.id AS organization_id, a.id AS template_agent_id,
                       a.name, a.description, o.visibility, r.id, r.version,
                       p.version AS predecessor_version,
                       CASE WHEN :with_snapshot THEN r.snapshot END AS snapshot,
                       r.content_hash, r.notes, r.source,
                       r.created_at, {REQUIRES.format(release="r.id")} AS requires
                FROM {TEMPLATES}
                LEFT JOIN LATERAL (
                    SELECT * FROM template_releases x WHERE x.template_agent_id = a.id
                      AND (x.version = CAST(:version AS int) OR CAST(:version AS int) IS NULL)
                    ORDER BY x.version DESC LIMIT 1) r ON true
                LEFT JOIN template_releases p ON p.id = r.predecessor_id
                WHERE {VISIBLE} AND o.slug = :slug"""  # noqa: S608 (constants only)


def release_params(
    actor: Actor, slug: str, version: int | None, *, with_snapshot: bool = False
) -> dict[str, Any]:
    """Bind parameters of `RELEASE_SQL`."""
    return {
        **visibility_params(actor),
        "slug": slug,
        "version": version,
        "with_snapshot": with_snapshot,
    }


# The columns of `RELEASE_SQL`'s row.
RELEASE_COLUMNS = (
    "template",
    "organization_id",
    "template_agent_id",
    "name",
    "description",
    "visibility",
    "id",
    "version",
    "predecessor_version",
    "snapshot",
    "content_hash",
    "notes",
    "source",
    "created_at",
    "requires",
)


def checked_release(
    found: Mapping[Any, Any] | None, slug: str, version: int | None
) -> dict[str, Any]:
    """The release `RELEASE_SQL` found (its columns in `found`, all NULL when it found no
    template), or the `NotFound` saying what was missing."""
    if "\x00" in slug or found is None or found["template"] is None:
        # No slug holds NUL (PostgreSQL refuses it): never looked up.
        raise NotFound(f"template {slug!r} not found", code="template_not_found")
    if found["id"] is None:
        what = f"release {version}" if version is not None else "any release"
        raise NotFound(f"template {slug!r} has no {what}", code="release_not_found")
    return {column: found[column] for column in RELEASE_COLUMNS}


async def get_release(
    session: AsyncSession,
    actor: Actor,
    slug: str,
    version: int | None = None,
    *,
    with_snapshot: bool = False,
) -> dict[str, Any]:
    """One release (the latest by default) of a template the actor can see, as a row.

    The snapshot is large; it is fetched only when asked for (installs read it in SQL)."""
    if "\x00" in slug:  # no slug holds NUL (PostgreSQL refuses it)
        raise NotFound(f"template {slug!r} not found", code="template_not_found")
    row = (
        await session.execute(
            text(RELEASE_SQL), release_params(actor, slug, version, with_snapshot=with_snapshot)
        )
    ).first()
    return checked_release(None if row is None else row._mapping, slug, version)
