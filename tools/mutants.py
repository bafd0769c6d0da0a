"""The mutants of the mutation pass (`python -m tools.mutation`), and the tests that face them.

Each is one bug a careless change could plausibly bring: write new ones as the code grows, and
rewrite a mutant reported stale for the code as it now reads.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE = "install_service/installs/engine.py"
INSTALLS = "install_service/installs/service.py"
TEMPLATES = "install_service/templates/service.py"
RESYNC = "install_service/resync/service.py"
ORGS = "install_service/orgs/service.py"

# The tests that exercise each module, quickest to fail first (a pass stops at the first).
TESTS = {
    ENGINE: ["tests/test_install.py", "tests/test_races.py", "tests/test_publish.py"],
    INSTALLS: ["tests/test_install.py", "tests/test_races.py", "tests/test_api.py"],
    TEMPLATES: ["tests/test_publish.py", "tests/test_install.py", "tests/test_races.py"],
    RESYNC: ["tests/test_resync.py", "tests/test_faults.py"],
    ORGS: ["tests/test_install.py", "tests/test_security.py", "tests/test_api.py"],
}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    equivalent: str = ""  # why no correct program could tell it from the original


MUTANTS = [
    # The plan: which items are created, updated, archived or in conflict, and why.
    Mutant("plan.org-archive-is-no-edit", ENGINE, "\n" + " " * 36 + "OR f.archived_locally", ""),
    Mutant(
        "plan.force-ignored",
        ENGINE,
        "WHEN (changes OR reactivates) AND edited AND NOT :force THEN 'conflict'",
        "WHEN (changes OR reactivates) AND edited THEN 'conflict'",
    ),
    Mutant(
        "plan.force-overrides-user-authored",
        ENGINE,
        "WHEN NOT ours THEN 'conflict'",
        "WHEN NOT ours AND NOT :force THEN 'conflict'",
    ),
    Mutant(
        "plan.conflict-reasons-swapped",
        ENGINE,
        "WHEN NOT ours AND managed_by IS NULL THEN 'user_authored'",
        "WHEN NOT ours AND managed_by IS NOT NULL THEN 'user_authored'",
    ),
    Mutant(
        "plan.archived-rows-archived-again",
        ENGINE,
        "OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AND o.status = 'active'",
        "OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid)",
    ),
    Mutant("plan.system-rows-planned", ENGINE, "\n           AND o.slug NOT LIKE '$%')", ")"),
    Mutant(
        "plan.edit-equal-to-release-conflicts",
        ENGINE,
        "\n                                     AND f.cur_hash IS DISTINCT FROM f.new_hash)",
        ")",
    ),
    Mutant(
        "plan.changes-against-current-content",
        ENGINE,
        "CASE WHEN :mirrored THEN f.new_hash IS DISTINCT FROM f.mirrored_hash",
        "CASE WHEN :mirrored THEN f.new_hash IS DISTINCT FROM f.cur_hash",
    ),
    Mutant(
        "plan.archived-rows-never-reactivated",
        ENGINE,
        "f.status = 'archived' AND NOT f.archived_locally AS reactivates",
        "false AS reactivates",
    ),
    Mutant(
        "plan.uninstalled-rows-count-as-local-archives",
        ENGINE,
        "j.status = 'archived' AND j.in_prev AND :install_active",
        "j.status = 'archived' AND j.in_prev",
    ),
    Mutant(
        "plan.release-archives-count-as-local",
        ENGINE,
        "j.status = 'archived' AND j.in_prev AND :install_active",
        "j.status = 'archived' AND :install_active",
    ),
    Mutant(
        "plan.archived-content-not-read",
        ENGINE,
        "\n                          OR o.status = 'archived')",
        ")",
    ),
    Mutant("plan.dropped-items-unseen", ENGINE, "FULL JOIN org o ON", "LEFT JOIN org o ON"),
    # The apply statement and its check.
    Mutant(
        "apply.overwrites-rows-of-others",
        ENGINE,
        "\n    WHERE t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)"
        "\n    RETURNING t.id, t.slug",
        "\n    RETURNING t.id, t.slug",
    ),
    Mutant(
        "apply.stale-rules-matched-by-source",
        ENGINE,
        "AND w.src = x.source_entity_type_id AND w.tgt = x.target_entity_type_id",
        "AND w.src = x.source_entity_type_id",
    ),
    Mutant(
        "apply.stale-rules-matched-by-target",
        ENGINE,
        "AND w.src = x.source_entity_type_id AND w.tgt = x.target_entity_type_id",
        "AND w.tgt = x.target_entity_type_id",
    ),
    Mutant(
        "apply.versions-start-at-2",
        ENGINE,
        "x.{owner} = i.id), 0) + 1",
        "x.{owner} = i.id), 1) + 1",
    ),
    Mutant(
        "apply.version-for-every-written-row",
        ENGINE,
        "\n      AND NOT (v.id IS NOT NULL AND ROW({current}) IS NOT DISTINCT FROM ROW({new})))",
        ")",
    ),
    Mutant(
        "apply.current-version-cleared",
        ENGINE,
        'f"{c} = coalesce(excluded.{c}, t.{c})"',
        'f"{c} = excluded.{c}"',
    ),
    Mutant(
        "apply.no-mirrored-hash",
        ENGINE,
        "CASE WHEN :mirrored THEN i.content_hash END",
        "CASE WHEN :mirrored THEN NULL END",
    ),
    Mutant(
        "apply.source-row-from-target-org",
        ENGINE,
        "(SELECT s.id FROM {table} s WHERE s.organization_id = CAST(:source_org AS uuid)",
        "(SELECT s.id FROM {table} s WHERE s.organization_id = CAST(:org AS uuid)",
    ),
    Mutant(
        "apply.integrity-errors-not-translated",
        ENGINE,
        'if getattr(exc.orig, "sqlstate", None) not in CHANGED_UNDER_APPLY:',
        "if True:",
    ),
    Mutant(
        "apply.short-write-not-checked",
        ENGINE,
        "    if missing:\n",
        "    if False:\n",
        equivalent="the check after the write reports the same rows as the same error (listed "
        "in another order when there are several): a row the write skipped is not an active "
        "row of this owner equal to its item",
    ),
    Mutant("apply.not-verified", ENGINE, "    await verify(session, target, planned)\n", ""),
    Mutant(
        "verify.content-not-compared",
        ENGINE,
        '\n   OR install_content_hash({_content_of("o.kind", "o.id")}) <> n.hash',
        "",
    ),
    Mutant(
        "content.foreign-reference-looks-local",
        ENGINE,
        "CASE WHEN {alias}.organization_id = t.organization_id THEN {alias}.slug",
        "CASE WHEN true THEN {alias}.slug",
    ),
    Mutant(
        "plan.archive-only-release-writes-nothing",
        ENGINE,
        'item.action in ("create", "update", "archive") for item',
        'item.action in ("create", "update") for item',
    ),
    # Archiving, locking, drift.
    Mutant("archive.system-rows-archived", ENGINE, "\n      AND slug NOT LIKE '$%'", ""),
    Mutant(
        "archive.archived-rows-archived-again",
        ENGINE,
        "WHERE organization_id = CAST(:org AS uuid) AND status = 'active'",
        "WHERE organization_id = CAST(:org AS uuid)",
    ),
    Mutant("lock.managed-rows-not-locked", ENGINE, "\n    FOR UPDATE)", ")"),
    Mutant("lock.rules-not-locked", ENGINE, "\n    FOR UPDATE OF r)", ")"),
    Mutant("drift.archived-and-deleted-swapped", ENGINE, "THEN 'deleted'", "THEN 'archived'"),
    Mutant(
        "drift.deleted-rows-unseen",
        ENGINE,
        "WHERE o.id IS NULL OR o.status = 'archived'",
        "WHERE o.status = 'archived'",
    ),
    Mutant(
        "drift.archived-rows-unseen",
        ENGINE,
        "WHERE o.id IS NULL OR o.status = 'archived'",
        "WHERE o.id IS NULL",
    ),
    # The install lifecycle.
    Mutant(
        "install.members-may-install",
        INSTALLS,
        "    require_manager(actor, org)\n    release",
        "    release",
    ),
    Mutant(
        "install.into-template-org",
        INSTALLS,
        'if release["organization_id"] == org.id:',
        "if False:",
    ),
    Mutant(
        "install.noop-at-any-release",
        INSTALLS,
        '\n            and row.installed_release_id == release["id"]',
        "",
    ),
    Mutant(
        "install.upgrade-without-row-locks",
        INSTALLS,
        "    if created_id is None:\n        await engine.lock(session, target)\n",
        "",
    ),
    Mutant("install.install-row-not-locked", INSTALLS, ' + " FOR UPDATE OF a"', ""),
    Mutant(
        "install.upgrade-and-rollback-swapped",
        INSTALLS,
        'if release["version"] > row.installed_version:',
        'if release["version"] < row.installed_version:',
    ),
    Mutant(
        "install.uninstalled-upgrade-not-a-reinstall",
        INSTALLS,
        'if row.status != "active" or row.installed_version is None:',
        "if row.installed_version is None:",
    ),
    Mutant(
        "install.history-from-and-to-swapped",
        INSTALLS,
        'from_release=row.installed_release_id,\n        to_release=release["id"],',
        'from_release=release["id"],\n        to_release=row.installed_release_id,',
    ),
    Mutant(
        "install.no-previous-release",
        INSTALLS,
        "previous_release_id=row.installed_release_id if row else None,",
        "previous_release_id=None,",
    ),
    Mutant(
        "install.uninstalled-counts-as-active",
        INSTALLS,
        'install_active=bool(row and row.status == "active"),',
        "install_active=bool(row),",
    ),
    Mutant("install.dry-run-writes", INSTALLS, "if dry_run or at_release:", "if at_release:"),
    Mutant(
        "uninstall.twice-records-twice",
        INSTALLS,
        '    if found["status"] == "active":\n        archived',
        "    if True:\n        archived",
    ),
    Mutant(
        "uninstall.members-may-uninstall",
        INSTALLS,
        "    require_manager(actor, org)\n    changes",
        "    changes",
    ),
    Mutant(
        "install.visible-to-non-members",
        INSTALLS,
        "if row is None or (row.role is None and not actor.is_platform_admin):",
        "if row is None:",
    ),
    Mutant(
        "drift.of-uninstalled-install",
        INSTALLS,
        '    if found["status"] == "active":\n        drifted',
        "    if True:\n        drifted",
    ),
    # Publishing and reading releases.
    Mutant("publish.agent-not-locked", TEMPLATES, "AND is_template FOR UPDATE", "AND is_template"),
    Mutant(
        "publish.first-version-2",
        TEMPLATES,
        '"version": (latest.version if latest else 0) + 1,',
        '"version": (latest.version if latest else 1) + 1,',
    ),
    Mutant(
        "publish.no-predecessor",
        TEMPLATES,
        '"predecessor": latest.id if latest else None,',
        '"predecessor": None,',
    ),
    Mutant(
        "publish.unchanged-cuts-release",
        TEMPLATES,
        "if latest is not None and latest.same:",
        "if False:",
    ),
    Mutant(
        "publish.latest-is-oldest",
        TEMPLATES,
        "ORDER BY r.version DESC LIMIT 1",
        "ORDER BY r.version LIMIT 1",
    ),
    Mutant(
        "publish.takes-over-customer-org",
        TEMPLATES,
        "    if not existing.is_template_org:\n        raise",
        "    if False:\n        raise",
    ),
    Mutant(
        "publish.visibility-never-changes",
        TEMPLATES,
        "UPDATE organizations SET name = :name, visibility = :visibility",
        "UPDATE organizations SET name = :name",
    ),
    Mutant(
        "release.private-visible-to-all",
        TEMPLATES,
        "(o.visibility = 'public' OR :admin",
        "(o.visibility IN ('public', 'private') OR :admin",
    ),
    Mutant(
        "release.unknown-version-falls-back",
        TEMPLATES,
        "AND (x.version = CAST(:version AS int) OR",
        "AND (x.version <= CAST(:version AS int) OR",
    ),
    # Resync runs.
    Mutant(
        "resync.claim-waits-for-held-items",
        RESYNC,
        "FOR UPDATE OF i SKIP LOCKED",
        "FOR UPDATE OF i",
    ),
    Mutant(
        "resync.nothing-succeeded-is-partial",
        RESYNC,
        "WHEN c.succeeded = 0 THEN 'failed'",
        "WHEN c.succeeded = 0 THEN 'partial'",
    ),
    Mutant("resync.finished-with-items-pending", RESYNC, " AND c.pending = 0", ""),
    Mutant(
        "resync.uninstalled-installs-included",
        RESYNC,
        "WHERE a.template_agent_id = :agent AND a.status = 'active'",
        "WHERE a.template_agent_id = :agent",
    ),
    Mutant(
        "resync.conflict-recorded-as-failure",
        RESYNC,
        'outcome = {"status": "conflict",',
        'outcome = {"status": "failed",',
    ),
    Mutant(
        "resync.retry-skips-failed",
        RESYNC,
        "AND status IN ('conflict', 'failed') RETURNING 1",
        "AND status IN ('conflict') RETURNING 1",
    ),
    Mutant(
        "resync.retry-while-running", RESYNC, "    if status not in FINISHED:\n", "    if False:\n"
    ),
    Mutant(
        "resync.finished-run-restarted",
        RESYNC,
        "WHERE id = :run AND status IN ('queued', 'running')\n            RETURNING status",
        "WHERE id = :run\n            RETURNING status",
    ),
    Mutant(
        "resync.empty-run-not-finished",
        RESYNC,
        " AND NOT EXISTS (SELECT 1 FROM items)",
        " AND false",
    ),
    Mutant("resync.attempts-not-counted", RESYNC, "attempts = attempts + 1", "attempts = 1"),
    # Who may do what.
    Mutant(
        "orgs.revoked-token-accepted",
        ORGS,
        "WHERE t.token_hash = :hash AND t.revoked_at IS NULL",
        "WHERE t.token_hash = :hash",
    ),
    Mutant("orgs.members-are-managers", ORGS, "org.role in MANAGER_ROLES", "org.role in ROLES"),
    Mutant(
        "orgs.non-members-find-orgs",
        ORGS,
        "if row.role is None and not actor.is_platform_admin:",
        "if False:",
    ),
    Mutant(
        "orgs.default-org-any-membership",
        ORGS,
        "where = \"o.kind = 'personal' AND m.role = 'owner'\"",
        'where = "m.role IS NOT NULL"',
    ),
    Mutant(
        "orgs.email-case-kept",
        ORGS,
        "VALUES (lower(:email), :name, :admin)",
        "VALUES (:email, :name, :admin)",
    ),
    Mutant(
        "orgs.role-change-ignored",
        ORGS,
        "DO UPDATE SET role = excluded.role",
        "DO UPDATE SET role = memberships.role",
    ),
    Mutant(
        "orgs.token-hash-not-compared",
        ORGS,
        "if row is None or not hmac.compare_digest(row.token_hash, digest):",
        "if row is None:",
        equivalent="the row was found by `token_hash = :hash`, so the two digests are equal; "
        "the comparison is there for constant time, not for a different answer",
    ),
]
