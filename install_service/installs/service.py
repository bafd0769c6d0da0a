"""The install lifecycle: install, upgrade, roll back, dry-run, uninstall, drift, history.

Every caller (HTTP API, resync jobs, CLI, test harness) goes through `install` /
`upgrade` / `uninstall` here, each running inside the caller's single transaction. Nothing here
commits. Concurrency safety comes from UNIQUE(template_agent_id, organization_id) on agents and
the install row's lock, never from read-then-insert.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from install_service import engine
from install_service.actor import Actor, OrgAccess, sees_emails
from install_service.db.session import statement
from install_service.errors import Conflict, Invalid, NotFound
from install_service.events import outbox
from install_service.installs import pins, plans
from install_service.installs.schemas import (
    Action,
    HistoryEvent,
    HistoryPage,
    Install,
    InstallLink,
    InstallPage,
    InstallResult,
    ItemRef,
    KindChanges,
    Overwritten,
    PlanItem,
    Resolution,
    TemplateRef,
)
from install_service.orgs.schemas import OrgRef
from install_service.orgs.service import checked_org, org_access_sql, require_manager, resolve_org
from install_service.pagination import Keyset, PageRequest
from install_service.releases import (
    RELEASE_COLUMNS,
    RELEASE_SQL,
    checked_release,
    get_release,
    release_params,
)

_INSTALL_ROW = """
    SELECT a.id, a.status, a.installed_release_id, r.version AS installed_version
    FROM agents a LEFT JOIN template_releases r ON r.id = a.installed_release_id"""


async def install(
    session: AsyncSession,
    actor: Actor,
    *,
    template: str,
    organization: str | None = None,
    version: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    resolutions: Sequence[Resolution] = (),
    adopt: bool | Sequence[ItemRef] = (),
    pin: bool = False,
    with_requirements: bool = False,
) -> InstallResult:
    """Install `template` (release `version`, default latest) into an org, idempotently.

    Installing the installed release again is a no-op that writes nothing; a newer release
    upgrades, an older one rolls back; after an uninstall it reinstalls the same rows. Rows the
    org edited are merged field by field with the release; `resolutions` settle conflicting
    paths, `force` takes the release's value at every conflicting path, `adopt` takes over the
    org's own rows whose slugs the release uses. `pin` then pins the install where it landed
    (until unpinned), so that resyncs leave it there; pins never hold the org's own upgrades.
    A release's requirements must be installed in the org (422 `missing_requirement`), unless
    `with_requirements` installs or upgrades them first, in the same transaction.
    """
    options = engine.Options(
        force=force,
        resolutions=_resolutions(resolutions),
        adopt=() if isinstance(adopt, bool) else tuple(f"{a.kind}:{a.slug}" for a in adopt),
        adopt_all=adopt is True,
    )
    # A no-op is decided without a plan where it can be; only a plan can judge adoptions and
    # resolutions (it must know every item they name).
    quick = not dry_run and not (options.resolutions or options.adopt or options.adopt_all)
    org, release, existing, counts = await _checked(
        session, actor, organization, template, version, quick=quick
    )
    if counts is not None and existing is not None:  # counts come with an install only
        result = _unchanged(existing.id, counts, org, release)
    else:
        (outcome,) = await engine.sync(
            session,
            engine.Release.of(release),
            [
                engine.Install(
                    organization_id=org.id,
                    id=existing.id if existing else None,
                    status=existing.status if existing else None,
                    installed_release_id=existing.installed_release_id if existing else None,
                    installed_version=existing.installed_version if existing else None,
                )
            ],
            actor=actor,
            options=options,
            dry_run=dry_run,
            with_requirements=with_requirements,
        )
        # The org's values behind each conflicting or listed path, as line diffs where long.
        target = engine.Target(
            organization_id=org.id,
            release_id=release["id"],
            owner=release["template_agent_id"],
            agent_id=outcome.install.id,
        )
        items: list[PlanItem] | None = None
        if dry_run:
            version = release["version"]
            items = await plans.public_items(session, target, outcome.plan, version=version)
        elif outcome.status == "conflict":
            await plans.raise_conflicts(session, target, outcome.plan, version=release["version"])
        elif outcome.status != "unchanged":
            items = plans.written_items(outcome.plan)
        result = _result(org, release, outcome, dry_run=dry_run, items=items)
    if pin and not dry_run and result.id is not None:
        await pins.set_pin(session, actor, result.id, org.id, until=None, reason=None)
    return result


def _result(
    org: OrgAccess,
    release: dict[str, Any],
    outcome: engine.Outcome,
    *,
    dry_run: bool,
    items: list[PlanItem] | None,
) -> InstallResult:
    """What an install, upgrade or rollback (or its dry run) answers."""
    planned = outcome.plan
    noop = outcome.status == "unchanged"
    return InstallResult(
        id=outcome.install.id,
        organization=OrgRef(id=org.id, slug=org.slug),
        template=TemplateRef(slug=release["template"]),
        version=release["version"],
        status="active",
        created=outcome.created and outcome.status == "written",
        dry_run=dry_run,
        action="none" if noop else cast(Action, outcome.action),
        changes=plans.changes(planned),
        overwritten=[Overwritten(**o) for o in planned.overwritten()] or None,
        items=items,
        conflicts=len(planned.conflicts),
        would_conflict=bool(planned.conflicts),
    )


class _Org(msgspec.Struct, kw_only=True):
    id: uuid.UUID | None
    slug: str | None
    kind: str | None
    role: str | None


# What an install starts from, in one round trip: the org and the caller's role in it, the
# release and the install, if any; and, asked for (`quick`) and the install active at that
# release, whether installing it again changes nothing (`engine.unchanged_counts`). The
# statement also makes the rest of the transaction use generic plans for its prepared
# statements: an install's statements are then planned once per connection instead of on every
# call (their custom plans gain nothing: the same shapes, and the plan statement took longer to
# plan than to run). This one stays out of it: PostgreSQL settles on its generic plan by
# itself.
_CONTEXT = """
WITH plan_mode AS MATERIALIZED (
    SELECT set_config('plan_cache_mode', 'force_generic_plan', true)),
org AS ({org}),
rel AS ({release}),
install AS (
    SELECT a.id, a.status, a.installed_release_id, r.version AS installed_version
    FROM org JOIN rel ON true
    JOIN agents a ON a.template_agent_id = rel.template_agent_id
                 AND a.organization_id = org.id
    LEFT JOIN template_releases r ON r.id = a.installed_release_id)
SELECT org.id AS org_id, org.slug AS org_slug, org.kind AS org_kind, org.role AS org_role,
       {release_columns},
       install.id AS install_id, install.status AS install_status,
       install.installed_release_id, install.installed_version,
       CASE WHEN CAST(:quick AS boolean) AND install.status = 'active'
                 AND install.installed_release_id = rel.id
            THEN {unchanged} END AS unchanged
FROM plan_mode LEFT JOIN org ON true LEFT JOIN rel ON true LEFT JOIN install ON true
"""


@functools.cache
def _context_statement(org_sql: str) -> TextClause:
    return statement(
        _CONTEXT.format(
            org=org_sql,
            release=RELEASE_SQL,
            release_columns=", ".join(f"rel.{c}" for c in RELEASE_COLUMNS),
            unchanged=engine.unchanged_counts("org.id", "rel.id", "rel.template_agent_id"),
        )
    )


async def _checked(
    session: AsyncSession | AsyncConnection,
    actor: Actor,
    organization: str | None,
    template: str,
    version: int | None,
    *,
    quick: bool,
) -> tuple[OrgAccess, dict[str, Any], _NewInstall | None, dict[str, int] | None]:
    """The org (the actor managing it), the release (one that may be installed there) and the
    install, if any, from one statement (`_CONTEXT`); with, where `quick` and nothing would
    change, the items per kind, else None. Raises what the caller may not do."""
    org_sql, org_params = org_access_sql(actor, organization)
    row = (
        await session.execute(
            _context_statement(org_sql),
            # A slug holding NUL (which PostgreSQL refuses) is looked up as one matching
            # nothing; `checked_release` then says so.
            {
                **org_params,
                **release_params(actor, template.replace("\x00", ""), version),
                "quick": quick,
            },
        )
    ).one()
    found = row._mapping
    org = checked_org(
        actor, organization, _Org(**{k: found[f"org_{k}"] for k in ("id", "slug", "kind", "role")})
    )
    require_manager(actor, org)
    release = checked_release({c: found[c] for c in RELEASE_COLUMNS}, template, version)
    if release["organization_id"] == org.id:
        raise Invalid(
            "a template cannot be installed into its own organization",
            code="install_into_template_org",
        )
    install = None
    if found["install_id"] is not None:
        install = _NewInstall(
            id=found["install_id"],
            status=found["install_status"],
            installed_release_id=found["installed_release_id"],
            installed_version=found["installed_version"],
        )
    return org, release, install, found["unchanged"]


# What `install` may be asked beyond installing: a no-op never answers these.
_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions", "adopt")


async def noop(
    db: AsyncEngine,
    actor: Actor,
    *,
    template: str,
    organization: str | None = None,
    version: int | None = None,
    **options: Any,
) -> InstallResult | None:
    """What `install` would answer to these arguments, when it would change nothing, from one
    read-only statement outside any transaction: one round trip, no transaction id. None when
    it may change something; `install` then answers in a transaction of the caller's.

    Installing the installed release again, with nothing edited since, is the idempotent call
    a fleet's provisioning repeats most. `options` are `install`'s others: any that asks for
    more than installing (a dry run, a pin, adoptions or resolutions) is left to `install`, as
    is a caller whose token's use is due to be noted (at most once a minute): that write
    belongs in the request's transaction. Errors are `install`'s own (unknown org or
    template, not a manager, ...): nothing was written.
    """
    if actor.note_token_use or any(options.get(name) for name in _MORE_THAN_INSTALLING):
        return None
    async with db.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        org, release, existing, counts = await _checked(
            autocommit, actor, organization, template, version, quick=True
        )
    if counts is None or existing is None:
        return None
    return _unchanged(existing.id, counts, org, release)


def _unchanged(
    install_id: uuid.UUID, counts: dict[str, int], org: OrgAccess, release: dict[str, Any]
) -> InstallResult:
    """The answer to re-installing the installed release when nothing changed: a no-op."""
    return InstallResult(
        id=install_id,
        organization=OrgRef(id=org.id, slug=org.slug),
        template=TemplateRef(slug=release["template"]),
        version=release["version"],
        status="active",
        created=False,
        dry_run=False,
        action="none",
        changes=_changes(
            {
                kind: dict.fromkeys(engine.CHANGE_LABELS, 0) | {"unchanged": counts.get(kind, 0)}
                for kind in engine.KINDS
            }
        ),
    )


def _resolutions(resolutions: Sequence[Resolution]) -> dict[str, dict[str, str]]:
    """`kind:slug` -> {path: take}; no path is the whole item (`''`)."""
    by_item: dict[str, dict[str, str]] = {}
    for r in resolutions:
        by_item.setdefault(f"{r.kind}:{r.slug}", {})[r.path or ""] = r.take
    return by_item


async def upgrade(
    session: AsyncSession,
    actor: Actor,
    install_id: uuid.UUID,
    *,
    version: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    resolutions: Sequence[Resolution] = (),
    adopt: bool | Sequence[ItemRef] = (),
    pin: bool = False,
    with_requirements: bool = False,
) -> InstallResult:
    """Move an install to release `version` (default latest): upgrade or roll back; `pin`
    pins it there (a deliberate rollback a resync must not undo)."""
    found = await load_install(session, actor, install_id)
    return await install(
        session,
        actor,
        template=found["template"],
        organization=str(found["organization_id"]),
        version=version,
        dry_run=dry_run,
        force=force,
        resolutions=resolutions,
        adopt=adopt,
        pin=pin,
        with_requirements=with_requirements,
    )


class _NewInstall(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    status: str = "active"
    installed_release_id: uuid.UUID | None = None
    installed_version: int | None = None


def _changes(counts: dict[str, dict[str, int]]) -> dict[str, KindChanges]:
    return {kind: KindChanges(**c) for kind, c in counts.items()}


def _requiring(org: str, owner: str) -> str:
    """FROM and WHERE of the active installs `d` in org `org` whose installed release requires
    template `owner` (contract §13), with their template's org `q`."""
    return f"""
    FROM agents d
    JOIN template_release_requirements rr ON rr.release_id = d.installed_release_id
    JOIN agents dt ON dt.id = d.template_agent_id
    JOIN organizations q ON q.id = dt.organization_id
    WHERE d.organization_id = {org} AND d.status = 'active'
      AND rr.required_template_agent_id = {owner}"""


# The installs requiring the template, locked: none is installed or moved while its
# requirement is uninstalled.
_DEPENDENTS = f"""
    SELECT d.id, q.slug AS template {_requiring(":org", ":owner")}
    ORDER BY q.slug
    FOR UPDATE OF d"""


async def uninstall(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, *, cascade: bool = False
) -> InstallResult:
    """Archive every row the install manages and mark it uninstalled; versions and history stay.

    Installing again reactivates the same rows. Uninstalling twice is a no-op. An install
    that active installs in the org require is a 409 `required_by`, unless `cascade`
    uninstalls them first (theirs first), in the same transaction.
    """
    found = await manageable(session, actor, install_id, lock=True)
    if found["status"] == "active":
        dependents = (
            await session.execute(
                statement(_DEPENDENTS),
                {"org": found["organization_id"], "owner": found["template_agent_id"]},
            )
        ).all()
        if dependents and not cascade:
            names = ", ".join(d.template for d in dependents)
            raise Conflict(
                f"{found['template']} is required by {names} in this organization; uninstall "
                "them first, or pass cascade to uninstall them too",
                code="required_by",
                required_by=[{"template": d.template, "install_id": str(d.id)} for d in dependents],
            )
        for dependent in dependents:
            await uninstall(session, actor, dependent.id, cascade=True)
    org = OrgAccess(
        id=found["organization_id"], slug=found["org_slug"], kind="", role=found["role"]
    )
    changes = {kind: dict.fromkeys(engine.CHANGE_LABELS, 0) for kind in engine.KINDS}
    action: Action = "none"
    if found["status"] == "active":
        archived = await engine.archive_all(session, installed_target(found))
        for kind in engine.KINDS:
            changes[kind]["archived"] = len(archived[kind])
        action = "uninstall"
        await engine.record(
            session,
            [
                engine.Record(
                    install_id=install_id,
                    action=action,
                    from_release=found["installed_release_id"],
                    to_release=found["installed_release_id"],
                    status="uninstalled",
                    changes=changes,
                    items=[
                        outbox.Item(kind=kind, slug=slug, action="archived")
                        for kind in engine.KINDS
                        for slug in archived[kind]
                    ],
                )
            ],
            template=found["template"],
            actor=actor,
        )
    return InstallResult(
        id=install_id,
        organization=OrgRef(id=org.id, slug=org.slug),
        template=TemplateRef(slug=found["template"]),
        version=found["version"],
        status="uninstalled",
        created=False,
        dry_run=False,
        action=action,
        changes=_changes(changes),
    )


_LOAD_INSTALL = f"""
    SELECT a.id, a.organization_id, o.slug AS org_slug, a.status,
           a.template_agent_id, a.installed_release_id, r.version,
           tor.slug AS template, t.organization_id AS template_org_id,
           a.installed_at, a.last_synced_at,
           a.installed_by_user_id, m.role,
           {{pinned}} AS pinned,
           CASE WHEN {{pinned}} THEN a.pinned_until END AS pinned_until,
           CASE WHEN {{pinned}} THEN a.pin_reason END AS pin_reason,
           CASE WHEN {{pinned}} THEN a.pinned_at END AS pinned_at,
           CASE WHEN {{pinned}} THEN pu.email END AS pinned_by,
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'template', q.slug, 'min_version', rr.min_version, 'install_id', d.id,
                       'version', dr.version, 'status', d.status) ORDER BY q.slug), '[]')
            FROM template_release_requirements rr
            JOIN agents qa ON qa.id = rr.required_template_agent_id
            JOIN organizations q ON q.id = qa.organization_id
            LEFT JOIN agents d ON d.template_agent_id = rr.required_template_agent_id
                              AND d.organization_id = a.organization_id
            LEFT JOIN template_releases dr ON dr.id = d.installed_release_id
            WHERE rr.release_id = a.installed_release_id) AS requires,
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'template', q.slug, 'install_id', d.id,
                       'version', (SELECT dr.version FROM template_releases dr
                                   WHERE dr.id = d.installed_release_id),
                       'status', d.status) ORDER BY q.slug), '[]')
            {_requiring("a.organization_id", "a.template_agent_id")}) AS required_by
    FROM agents a
    JOIN organizations o ON o.id = a.organization_id
    LEFT JOIN users pu ON pu.id = a.pinned_by_user_id
    JOIN agents t ON t.id = a.template_agent_id
    JOIN organizations tor ON tor.id = t.organization_id
    LEFT JOIN template_releases r ON r.id = a.installed_release_id
    LEFT JOIN memberships m ON m.organization_id = a.organization_id
                           AND m.user_id = CAST(:actor AS uuid)
    WHERE {{where}}
    ORDER BY a.installed_at, a.id
    {{tail}}"""  # noqa: S608 (fixed fragments only)


async def load_install(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, *, lock: bool = False
) -> dict[str, Any]:
    """An install the actor can see (any member of its org); `NotFound` otherwise."""
    sql = _LOAD_INSTALL.format(
        where="a.id = :id", tail="FOR UPDATE OF a" if lock else "", pinned=pins.PINNED
    )
    row = (await session.execute(text(sql), {"id": install_id, "actor": actor.user_id})).first()
    if row is None or (row.role is None and not actor.is_platform_admin):
        raise NotFound(f"install {install_id} not found", code="install_not_found")
    return dict(row._mapping)


async def manageable(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, *, lock: bool = False
) -> dict[str, Any]:
    """An install the actor may change (owner or admin of its org); members get 403."""
    found = await load_install(session, actor, install_id, lock=lock)
    require_manager(
        actor,
        OrgAccess(id=found["organization_id"], slug=found["org_slug"], kind="", role=found["role"]),
    )
    return found


def installed_target(found: dict[str, Any]) -> engine.Target:
    """The engine's view of an existing install: its org, its release, its template."""
    return engine.Target(
        organization_id=found["organization_id"],
        release_id=found["installed_release_id"],
        owner=found["template_agent_id"],
        agent_id=found["id"],
    )


def describe(found: dict[str, Any], actor: Actor) -> Install:
    """An install as `actor` sees it (`found["role"]` is the actor's role in its org): who
    pinned it only for those who may see emails."""
    return Install(
        id=found["id"],
        organization=OrgRef(id=found["organization_id"], slug=found["org_slug"]),
        template=TemplateRef(slug=found["template"]),
        version=found["version"],
        status=found["status"],
        installed_at=found["installed_at"],
        last_synced_at=found["last_synced_at"],
        installed_by_user_id=found["installed_by_user_id"],
        pinned=found["pinned"],
        pinned_until=found["pinned_until"],
        pin_reason=found["pin_reason"],
        pinned_at=found["pinned_at"],
        pinned_by=found["pinned_by"] if sees_emails(actor, found["role"]) else None,
        requires=msgspec.convert(found["requires"], list[InstallLink]),
        required_by=msgspec.convert(found["required_by"], list[InstallLink]),
    )


async def get_install(session: AsyncSession, actor: Actor, install_id: uuid.UUID) -> Install:
    return describe(await load_install(session, actor, install_id), actor)


async def pin(
    session: AsyncSession,
    actor: Actor,
    install_id: uuid.UUID,
    *,
    until: datetime | None = None,
    reason: str | None = None,
) -> Install:
    """Hold the install at its release against resyncs until `until` (none: until unpinned).
    Pinning again the same way changes nothing."""
    found = await manageable(session, actor, install_id, lock=True)
    if until is not None and until <= datetime.now(UTC):
        raise Invalid(
            f"a pin must end in the future, not at {until.isoformat()}", code="pin_until_in_past"
        )
    if await pins.set_pin(
        session, actor, install_id, found["organization_id"], until=until, reason=reason
    ):
        found = await load_install(session, actor, install_id)
    return describe(found, actor)


async def unpin(session: AsyncSession, actor: Actor, install_id: uuid.UUID) -> Install:
    """Let resyncs move the install again; unpinning an install no pin holds is a no-op."""
    found = await manageable(session, actor, install_id, lock=True)
    if await pins.clear_pin(session, actor, install_id, found["organization_id"]):
        found = await load_install(session, actor, install_id)
    return describe(found, actor)


_INSTALLS = Keyset("installs", (datetime, uuid.UUID))


async def list_installs(
    session: AsyncSession, actor: Actor, org_ref: str, page: PageRequest
) -> InstallPage:
    """Installs in an org the actor is a member of, oldest first."""
    org = await resolve_org(session, actor, org_ref)
    where = """a.organization_id = :org
        AND (CAST(:after_0 AS timestamptz) IS NULL
             OR (a.installed_at, a.id) > (:after_0, CAST(:after_1 AS uuid)))"""
    rows = await session.execute(
        text(_LOAD_INSTALL.format(where=where, tail="LIMIT :limit_plus_one", pinned=pins.PINNED)),
        {"org": org.id, "actor": actor.user_id, **_INSTALLS.params(page)},
    )
    found = [describe(dict(r._mapping), actor) for r in rows]
    return _INSTALLS.page(InstallPage, found, page, lambda i: (i.installed_at, i.id))


async def list_template_installs(
    session: AsyncSession, actor: Actor, template: str, page: PageRequest
) -> InstallPage:
    """The installs of a template the actor can see, oldest first: every one for a platform
    admin, else those in organizations the actor is a member of."""
    release = await get_release(session, actor, template)
    where = """a.template_agent_id = :template_agent
        AND (m.role IS NOT NULL OR :admin)
        AND (CAST(:after_0 AS timestamptz) IS NULL
             OR (a.installed_at, a.id) > (:after_0, CAST(:after_1 AS uuid)))"""
    rows = await session.execute(
        text(_LOAD_INSTALL.format(where=where, tail="LIMIT :limit_plus_one", pinned=pins.PINNED)),
        {
            "template_agent": release["template_agent_id"],
            "actor": actor.user_id,
            "admin": actor.is_platform_admin,
            **_INSTALLS.params(page),
        },
    )
    found = [describe(dict(r._mapping), actor) for r in rows]
    return _INSTALLS.page(InstallPage, found, page, lambda i: (i.installed_at, i.id))


async def newer_release(session: AsyncSession, actor: Actor, install: Install) -> int | None:
    """The latest release of an active install's template when it is newer than the one
    installed (what an upgrade would move it to), else None."""
    if install.status != "active" or install.version is None:
        return None
    try:
        latest = await get_release(session, actor, install.template.slug)
    except NotFound:  # the template is no longer visible to the actor
        return None
    version: int = latest["version"]
    return version if version > install.version else None


_HISTORY = Keyset("history", (datetime, uuid.UUID))


async def history(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, page: PageRequest
) -> HistoryPage:
    """An install's history, oldest first."""
    await load_install(session, actor, install_id)
    rows = await session.execute(
        text("""
            SELECT e.id, e.action, f.version AS from_version, t.version AS to_version,
                   e.actor_user_id, e.changes, e.created_at
            FROM install_events e
            LEFT JOIN template_releases f ON f.id = e.from_release_id
            LEFT JOIN template_releases t ON t.id = e.to_release_id
            WHERE e.install_id = :id
              AND (CAST(:after_0 AS timestamptz) IS NULL
                   OR (e.created_at, e.id) > (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY e.created_at, e.id LIMIT :limit_plus_one"""),
        {"id": install_id, **_HISTORY.params(page)},
    )
    found = [msgspec.convert(dict(r._mapping), HistoryEvent) for r in rows]
    return _HISTORY.page(HistoryPage, found, page, lambda e: (e.created_at, e.id))
