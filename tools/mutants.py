"""The mutants of the mutation pass (`python -m tools.mutation`), and the tests that face them.

Each is one bug a careless change could plausibly bring: write new ones as the code grows, and
rewrite a mutant reported stale for the code as it now reads.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE = "install_service/engine.py"
MERGE = "install_service/migrations/versions/2026-11-30-0800_merge.py"
CONTENT = "install_service/migrations/versions/2026-12-06-0900_content_hash.py"
INSTALLS = "install_service/installs/service.py"
REPAIR = "install_service/installs/repair.py"
TEMPLATES = "install_service/templates/service.py"
RELEASES = "install_service/releases.py"
RESYNC = "install_service/resync/service.py"
EXECUTION = "install_service/resync/execution.py"
CONTROL = "install_service/resync/control.py"
FLEET = "install_service/resync/fleet.py"
ORGS = "install_service/orgs/service.py"
TOKENS = "install_service/orgs/tokens.py"
OUTBOX = "install_service/events/outbox.py"
FEED_API = "install_service/events/api.py"
ADDRESSES = "install_service/events/addresses.py"
PAGINATION = "install_service/pagination.py"
DEPS = "install_service/deps.py"
ERRORS = "install_service/errors.py"
ACTOR = "install_service/actor.py"
INVARIANTS = "install_service/installs/invariants.py"
CONSOLE_RUNS = "install_service/console/pages/runs.py"
CLI_OUTPUT = "install_service/cli/output.py"
CLI_RESYNC = "install_service/cli/resync.py"
MODELS = "install_service/db/models.py"
SCHEMA = "install_service/schema/service.py"
PLANS = "install_service/installs/plans.py"
DOCUMENTS = "install_service/templates/documents.py"
TEXTDIFF = "install_service/textdiff.py"
LANES = "install_service/events/lanes.py"
DISPATCHER = "install_service/events/dispatcher.py"
DELIVERY = "install_service/events/delivery.py"
WEBHOOKS = "install_service/events/webhooks.py"
JOBS = "install_service/resync/jobs.py"
LANE_TRIGGER = "install_service/migrations/versions/2026-12-06-0800_webhook_lanes.py"
REQUIREMENTS = "install_service/migrations/versions/2026-12-06-1100_template_requirements.py"
MOVED = "install_service/migrations/versions/2026-12-06-1600_plan_what_moved.py"
SETTLED = "install_service/migrations/versions/2026-12-06-1700_merge_settled_fields.py"
READ_ONCE = "install_service/migrations/versions/2026-12-06-1900_merge_reads_items_once.py"
LISTENER = "install_service/events/listener.py"
FEED = "install_service/events/feed.py"

# The tests that exercise each module, quickest to fail first (a pass stops at the first).
TESTS = {
    ENGINE: [
        "tests/test_install.py",
        "tests/test_merge.py",
        "tests/test_races.py",
        "tests/test_publish.py",
        "tests/test_content_hash.py",
        "tests/test_batches.py",
        "tests/test_events.py",
    ],
    MERGE: ["tests/test_merge_laws.py", "tests/test_merge.py"],
    CONTENT: ["tests/test_content_hash.py", "tests/test_install.py", "tests/test_merge.py"],
    INSTALLS: [
        "tests/test_install.py",
        "tests/test_merge.py",
        "tests/test_races.py",
        "tests/test_api.py",
        "tests/test_events.py",
        "tests/test_pins.py",
        "tests/test_access.py",
    ],
    REPAIR: ["tests/test_merge.py", "tests/test_install.py", "tests/test_events.py"],
    INVARIANTS: ["tests/test_merge.py", "tests/test_invariants.py"],
    TEMPLATES: [
        "tests/test_publish.py",
        "tests/test_install.py",
        "tests/test_races.py",
        "tests/test_events.py",
    ],
    RELEASES: ["tests/test_install.py", "tests/test_api.py"],
    RESYNC: [
        "tests/test_resync.py",
        "tests/test_rollout.py",
        "tests/test_faults.py",
        "tests/test_rollout_api.py",
    ],
    EXECUTION: [
        "tests/test_resync.py",
        "tests/test_rollout.py",
        "tests/test_faults.py",
        "tests/test_bulk_install.py",
    ],
    CONTROL: ["tests/test_resync.py", "tests/test_rollout.py", "tests/test_faults.py"],
    FLEET: [
        "tests/test_rollout.py",
        "tests/test_rollout_api.py",
        "tests/test_resync.py",
        "tests/test_bulk_install.py",
    ],
    ORGS: [
        "tests/test_access.py",
        "tests/test_install.py",
        "tests/test_security.py",
        "tests/test_api.py",
        "tests/test_webhooks.py",
        "tests/test_rollout_api.py",
    ],
    TOKENS: ["tests/test_access.py", "tests/test_security.py", "tests/test_events.py"],
    OUTBOX: ["tests/test_events.py", "tests/test_faults.py"],
    FEED_API: ["tests/test_events.py"],
    ADDRESSES: ["tests/test_webhooks.py"],
    PAGINATION: ["tests/test_pagination.py", "tests/test_rollout_api.py"],
    DEPS: ["tests/test_api.py", "tests/test_rollout_api.py", "tests/test_access.py"],
    ERRORS: ["tests/test_api.py", "tests/test_cli.py", "tests/test_documents.py"],
    ACTOR: ["tests/test_access.py", "tests/test_pins.py", "tests/test_api.py"],
    CONSOLE_RUNS: ["tests/test_console.py"],
    CLI_OUTPUT: ["tests/test_cli.py"],
    CLI_RESYNC: ["tests/test_cli.py"],
    MODELS: ["tests/test_migrations.py"],
    SCHEMA: [
        "tests/test_schema.py",
        "tests/test_cli_schema.py",
        "tests/test_console_schema.py",
    ],
    PLANS: ["tests/test_line_diffs.py", "tests/test_schema.py", "tests/test_console_schema.py"],
    DOCUMENTS: ["tests/test_documents.py", "tests/test_schema.py"],
    TEXTDIFF: ["tests/test_line_diffs.py", "tests/test_schema.py"],
    LANES: ["tests/test_webhook_lanes.py", "tests/test_webhooks.py", "tests/test_webhook_rules.py"],
    DISPATCHER: [
        "tests/test_webhook_lanes.py",
        "tests/test_webhooks.py",
        "tests/test_webhook_client.py",
    ],
    DELIVERY: [
        "tests/test_webhook_client.py",
        "tests/test_webhooks.py",
        "tests/test_webhook_lanes.py",
        "tests/test_webhook_rules.py",
    ],
    WEBHOOKS: ["tests/test_webhook_lanes.py", "tests/test_webhooks.py"],
    JOBS: ["tests/test_webhook_lanes.py", "tests/test_webhooks.py"],
    LANE_TRIGGER: ["tests/test_webhook_lanes.py", "tests/test_migrations.py"],
    REQUIREMENTS: ["tests/test_requirements.py", "tests/test_install.py"],
    MOVED: ["tests/test_batches.py", "tests/test_migrations.py"],
    SETTLED: ["tests/test_merge_laws.py", "tests/test_merge.py"],
    READ_ONCE: ["tests/test_merge_laws.py", "tests/test_merge.py"],
    LISTENER: ["tests/test_events.py"],
    FEED: ["tests/test_events.py", "tests/test_cli_events.py", "tests/test_webhook_lanes.py"],
}
# Template dependencies (contract §13) are faced by their own tests first, in every module.
for _path in (ENGINE, INSTALLS, TEMPLATES, FLEET, EXECUTION, DOCUMENTS):
    TESTS[_path].insert(0, "tests/test_requirements.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    equivalent: str = ""  # why no correct program could tell it from the original


MUTANTS = [
    # The plan: which items are created, updated, archived or in conflict, and why.
    Mutant(
        "plan.every-orgs-rows-under-generic-plans",
        ENGINE,
        'PLAN_SQL = f"""{_plan_body(_every_pair(_org_rows("organization_id = (CAST(:orgs AS uuid[]))[1]")))}',
        'PLAN_SQL = f"""{_plan_body(_every_pair(_org_rows("organization_id = ANY(CAST(:orgs AS uuid[]))")))}',
        equivalent="since the plan compares stored hashes, a generic plan finds one org's rows "
        "by index through `= ANY` too (the test of generic plans sees no table scanned either "
        "way, stale statistics or fresh); the equality stays as the cheaper form",
    ),
    Mutant(
        "plan.org-archive-is-no-edit",
        ENGINE,
        "j.status = 'archived' AND j.in_prev AND j.install_active AS archived_locally",
        "false AS archived_locally",
    ),
    Mutant(
        "plan.force-ignored",
        ENGINE,
        "h.resolutions, CASE WHEN :force THEN 'template' END)",
        "h.resolutions, NULL)",
    ),
    Mutant(
        "plan.force-overrides-user-authored",
        ENGINE,
        "WHEN NOT m.ours THEN 'conflict'",
        "WHEN NOT m.ours AND NOT :force THEN 'conflict'",
    ),
    Mutant(
        "plan.conflict-reasons-swapped",
        ENGINE,
        "WHEN action = 'conflict' AND NOT ours AND managed_by IS NULL THEN 'user_authored'",
        "WHEN action = 'conflict' AND NOT ours AND managed_by IS NOT NULL THEN 'user_authored'",
    ),
    Mutant(
        "plan.archived-rows-archived-again",
        ENGINE,
        "OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AND o.status = 'active'",
        "OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid)",
    ),
    Mutant("plan.system-rows-planned", ENGINE, "\n               AND o.slug NOT LIKE '$%'))", "))"),
    Mutant(
        "plan.edit-equal-to-release-conflicts",
        ENGINE,
        "\n                         AND f.cur_hash IS DISTINCT FROM f.new_hash)",
        ")",
    ),
    Mutant(
        "plan.every-item-changed-by-the-release",
        ENGINE,
        ":mirrored AND j.new_hash IS DISTINCT FROM j.mirrored_hash AS release_changes",
        ":mirrored AS release_changes",
    ),
    Mutant(
        "plan.archived-rows-never-reactivated",
        ENGINE,
        "WHEN m.merge IS NOT NULL OR m.release_changes OR m.status = 'archived'",
        "WHEN m.merge IS NOT NULL OR m.release_changes",
    ),
    Mutant(
        "plan.uninstalled-rows-count-as-local-archives",
        ENGINE,
        "j.status = 'archived' AND j.in_prev AND j.install_active AS archived_locally",
        "j.status = 'archived' AND j.in_prev AS archived_locally",
    ),
    Mutant(
        "plan.release-archives-count-as-local",
        ENGINE,
        "j.status = 'archived' AND j.in_prev AND j.install_active AS archived_locally",
        "j.status = 'archived' AND j.install_active AS archived_locally",
    ),
    Mutant(
        "plan.archived-content-not-read",
        ENGINE,
        "(f.release_changes OR f.status = 'archived' OR :reconcile",
        "(f.release_changes OR :reconcile",
    ),
    Mutant("plan.dropped-items-unseen", ENGINE, "FULL JOIN org o ON", "LEFT JOIN org o ON"),
    # The apply statement and its check.
    Mutant(
        "apply.overwrites-rows-of-others",
        ENGINE,
        "    WHERE (t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)\n           OR (t.managed_by_template_agent_id IS NULL\n               AND t.organization_id::text || ':{kind}:' || t.slug\n                   = ANY(CAST(:adopt_keys AS text[]))))\n",
        "    WHERE (true)\n",
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
        "NOT (v.id IS NOT NULL AND ROW({current}) IS NOT DISTINCT FROM ROW({new})) AS needs",
        "true AS needs",
    ),
    Mutant(
        "apply.current-version-cleared",
        ENGINE,
        '"current_version_id": "coalesce(excluded.current_version_id, t.current_version_id)",',
        '"current_version_id": "excluded.current_version_id",',
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
        '    if rows[0].n < params["expected"]:\n',
        "    if False:\n",
        equivalent="the check after the write reports the same rows as the same error (listed in another order when there are several): a row the write skipped is not an active row of this owner equal to its item",
    ),
    Mutant(
        "apply.not-verified",
        ENGINE,
        '    if lists["written_orgs"]:\n',
        "    if False:\n",
    ),
    Mutant(
        "verify.content-not-compared",
        ENGINE,
        "\n   OR o.content_hash IS DISTINCT FROM n.hash\n",
        "\n",
    ),
    Mutant(
        "content.foreign-reference-looks-local",
        CONTENT,
        "CASE WHEN {alias}.organization_id = t.organization_id THEN {alias}.slug",
        "CASE WHEN true THEN {alias}.slug",
    ),
    # The stored content hash: kept true by the database, written right by the engine.
    Mutant(
        "hash.rules-not-followed",
        CONTENT,
        """        IF TG_OP = 'INSERT' THEN
            {_rehash("entity_relationship_types", "SELECT n.relationship_type_id FROM changed n")}
        ELSIF""",
        """        IF TG_OP = 'INSERT' THEN
            NULL;
        ELSIF""",
    ),
    Mutant(
        "hash.entity-type-renames-not-followed",
        CONTENT,
        'f"SELECT c.id FROM event_classifiers c WHERE c.entity_type_id IN ({MOVED})",',
        'f"SELECT c.id FROM event_classifiers c WHERE false AND c.id IN ({MOVED})",',
    ),
    Mutant(
        "hash.new-watcher-version-not-seen",
        CONTENT,
        '"schedule",\n        "current_version_id",',
        '"schedule",',
    ),
    Mutant(
        "hash.forged-hash-kept",
        CONTENT,
        '(*CONTENT_COLUMNS[table], "content_hash"))\n    old = ", ".join(f"o.{c}" for c in (*CONTENT_COLUMNS[table], "content_hash"))',
        '(*CONTENT_COLUMNS[table], "id"))\n    old = ", ".join(f"o.{c}" for c in (*CONTENT_COLUMNS[table], "id"))',
    ),
    Mutant(
        "hash.engine-writes-no-hash",
        ENGINE,
        'values += ", i.target_hash"',
        'values += ", i.content_hash"',
    ),
    Mutant(
        "plan.edited-rows-taken-as-unedited",
        ENGINE,
        "OR (f.looked_at AND f.cur_hash IS DISTINCT FROM f.mirrored_hash",
        "OR (f.looked_at AND f.cur_hash IS DISTINCT FROM f.cur_hash",
    ),
    Mutant(
        "plan.archive-only-release-writes-nothing",
        ENGINE,
        'WRITES = ("create", "update", "adopt", "archive", "rebase")',
        'WRITES = ("create", "update", "adopt", "rebase")',
    ),
    # Archiving, locking, drift.
    Mutant(
        "archive.system-rows-archived",
        ENGINE,
        "\n      AND t.slug NOT LIKE '$%'",
        "",
    ),
    Mutant(
        "archive.archived-rows-archived-again",
        ENGINE,
        "WHERE {which.format(kind=kind)} AND t.status = 'active'",
        "WHERE {which.format(kind=kind)}",
    ),
    Mutant("lock.managed-rows-not-locked", ENGINE, "\n    FOR UPDATE)", ")"),
    Mutant("lock.rules-not-locked", ENGINE, "\n    FOR UPDATE OF r)", ")"),
    Mutant("drift.archived-and-deleted-swapped", ENGINE, "THEN 'deleted'", "THEN 'archived'"),
    Mutant(
        "drift.deleted-rows-unseen",
        ENGINE,
        "WHERE (o.id IS NULL AND NOT EXISTS (",
        "WHERE (false AND NOT EXISTS (",
    ),
    Mutant(
        "drift.archived-rows-unseen",
        ENGINE,
        "\n   OR o.status = 'archived'\n   OR o.content_hash IS DISTINCT FROM o.mirrored_hash",
        "\n   OR o.content_hash IS DISTINCT FROM o.mirrored_hash",
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
        ENGINE,
        "at_release = install.active and install.installed_release_id == release.id",
        "at_release = install.active",
    ),
    Mutant(
        "install.edit-since-the-plan-written-over",
        ENGINE,
        "      AND t.content_hash IS NOT DISTINCT FROM ((SELECT map FROM seen) ->> t.id::text)",
        "",
    ),
    Mutant(
        "install.install-row-not-locked",
        ENGINE,
        '      AND a.organization_id = ANY(CAST(:orgs AS uuid[]))\n    FOR UPDATE OF a"""',
        '      AND a.organization_id = ANY(CAST(:orgs AS uuid[]))"""',
    ),
    Mutant(
        "install.upgrade-and-rollback-swapped",
        ENGINE,
        "if release.version > install.installed_version:",
        "if release.version < install.installed_version:",
    ),
    Mutant(
        "install.uninstalled-upgrade-not-a-reinstall",
        ENGINE,
        "if not install.active or install.installed_version is None:",
        "if install.installed_version is None:",
    ),
    Mutant(
        "install.history-from-and-to-swapped",
        ENGINE,
        "from_release=outcome.install.installed_release_id,\n        to_release=release.id,",
        "from_release=release.id,\n        to_release=outcome.install.installed_release_id,",
    ),
    Mutant(
        "install.no-previous-release",
        ENGINE,
        "previous_release_id=install.installed_release_id,",
        "previous_release_id=None,",
    ),
    Mutant(
        "install.uninstalled-counts-as-active",
        ENGINE,
        "install_active=install.active,",
        "install_active=install.id is not None,",
    ),
    Mutant(
        "install.dry-run-writes",
        ENGINE,
        "    if dry_run:\n        plans = await _plans(",
        "    if False:\n        plans = await _plans(",
    ),
    Mutant(
        "install.quick-noop-at-any-release",
        INSTALLS,
        "\n                 AND install.installed_release_id = rel.id",
        "",
    ),
    Mutant(
        "install.quick-noop-when-uninstalled",
        INSTALLS,
        "CAST(:quick AS boolean) AND install.status = 'active'",
        "CAST(:quick AS boolean)",
    ),
    Mutant(
        "noop.pin-answered-without-a-transaction",
        INSTALLS,
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions", "adopt")',
        '_MORE_THAN_INSTALLING = ("dry_run", "resolutions", "adopt")',
    ),
    Mutant(
        "noop.adoptions-answered-without-a-plan",
        INSTALLS,
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions", "adopt")',
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions")',
    ),
    Mutant(
        "noop.dry-run-answered-without-a-plan",
        INSTALLS,
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions", "adopt")',
        '_MORE_THAN_INSTALLING = ("pin", "resolutions", "adopt")',
    ),
    Mutant(
        "noop.resolutions-answered-without-a-plan",
        INSTALLS,
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "resolutions", "adopt")',
        '_MORE_THAN_INSTALLING = ("dry_run", "pin", "adopt")',
    ),
    Mutant(
        "noop.due-token-use-not-noted",
        INSTALLS,
        "    if actor.note_token_use or any(",
        "    if any(",
    ),
    Mutant(
        "requirements.uninstalled-dependents-counted",
        INSTALLS,
        "    WHERE d.organization_id = {org} AND d.status = 'active'\n",
        "    WHERE d.organization_id = {org}\n",
    ),
    Mutant(
        "orgs.id-not-looked-up",
        ORGS,
        "    elif _as_uuid(ref) is None:\n",
        "    elif True:\n",
    ),
    Mutant(
        "install.quick-noop-with-adoptions",
        INSTALLS,
        "quick = not dry_run and not (options.resolutions or options.adopt or options.adopt_all)",
        "quick = not dry_run",
    ),
    Mutant(
        "noop.mirrored-hash-not-compared",
        ENGINE,
        "bool_and(coalesce(t.mirrored_hash = i.content_hash, false))",
        "bool_and(coalesce(t.slug = i.slug, false))",
    ),
    Mutant(
        "noop.other-managed-rows-ignored",
        ENGINE,
        "        FULL JOIN ({managed}) t ON t.kind = i.kind AND t.slug = i.slug)",
        "        LEFT JOIN ({managed}) t ON t.kind = i.kind AND t.slug = i.slug)",
    ),
    Mutant(
        "noop.missing-rows-ignored",
        ENGINE,
        "        FULL JOIN ({managed}) t ON t.kind = i.kind AND t.slug = i.slug)",
        "        RIGHT JOIN ({managed}) t ON t.kind = i.kind AND t.slug = i.slug)",
    ),
    Mutant(
        "uninstall.twice-records-twice",
        INSTALLS,
        '    if found["status"] == "active":\n        archived',
        "    if True:\n        archived",
    ),
    Mutant(
        "install.members-may-change-installs",
        INSTALLS,
        "    require_manager(\n        actor,\n",
        "    (\n        actor,\n",
    ),
    Mutant(
        "install.visible-to-non-members",
        INSTALLS,
        "if row is None or (row.role is None and not actor.is_platform_admin):",
        "if row is None:",
    ),
    Mutant(
        "drift.of-uninstalled-install",
        REPAIR,
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
        RELEASES,
        "(o.visibility = 'public' OR :admin",
        "(o.visibility IN ('public', 'private') OR :admin",
    ),
    Mutant(
        "release.unknown-version-falls-back",
        RELEASES,
        "AND (x.version = CAST(:version AS int) OR",
        "AND (x.version <= CAST(:version AS int) OR",
    ),
    # Resync runs.
    Mutant(
        "resync.claim-waits-for-held-items",
        EXECUTION,
        "ORDER BY i.wave, i.id LIMIT :batch\n        FOR UPDATE SKIP LOCKED),",
        "ORDER BY i.wave, i.id LIMIT :batch\n        FOR UPDATE),",
    ),
    Mutant(
        "resync.claim-from-any-wave",
        EXECUTION,
        "AND i.wave = (SELECT x.current_wave FROM resync_runs x",
        "AND i.wave >= (SELECT x.current_wave FROM resync_runs x",
    ),
    Mutant(
        "resync.claim-while-stopped",
        EXECUTION,
        "WHERE x.id = :run AND x.status = 'running')",
        "WHERE x.id = :run)",
    ),
    Mutant(
        "resync.claim-leaves-the-install-unlocked",
        EXECUTION,
        "WHERE NOT installs)\n        FOR UPDATE {busy}),",
        "WHERE NOT installs)),",
    ),
    Mutant(
        "resync.nothing-succeeded-is-partial",
        EXECUTION,
        "WHEN c.succeeded = 0 THEN 'failed'",
        "WHEN c.succeeded = 0 THEN 'partial'",
    ),
    Mutant(
        "resync.skipped-items-make-partial",
        EXECUTION,
        "count(*) FILTER (WHERE status IN ('conflict', 'failed')) AS bad",
        "count(*) FILTER (WHERE status <> 'succeeded') AS bad",
    ),
    Mutant(
        "resync.finished-with-items-pending", EXECUTION, "    if wave.pending:\n", "    if False:\n"
    ),
    Mutant(
        "resync.halt-at-the-threshold",
        EXECUTION,
        "attempted > 0 and bad > threshold * attempted",
        "attempted > 0 and bad >= threshold * attempted",
    ),
    Mutant(
        "resync.halt-counts-skipped",
        EXECUTION,
        "count(*) FILTER (WHERE status IN {sql_list(ATTEMPTED)}) AS attempted",
        "count(*) AS attempted",
    ),
    Mutant(
        "resync.uninstalled-installs-included",
        FLEET,
        "WHERE a.template_agent_id = :agent AND a.status = 'active'",
        "WHERE a.template_agent_id = :agent",
    ),
    Mutant(
        "resync.uninstalled-since-reinstalled",
        EXECUTION,
        'if item.install_status != "active":',
        "if False:",
    ),
    Mutant(
        "resync.pins-ignored",
        EXECUTION,
        "elif item.pinned and not item.include_pinned:",
        "elif False:",
    ),
    Mutant(
        "resync.conflict-recorded-as-failure",
        EXECUTION,
        '                    status="conflict",',
        '                    status="failed",',
    ),
    Mutant(
        "resync.retry-skips-failed",
        CONTROL,
        "WHERE run_id = :run AND status IN ('conflict', 'failed')",
        "WHERE run_id = :run AND status IN ('conflict')",
    ),
    Mutant(
        "resync.retry-while-running",
        CONTROL,
        "    if run.status not in FINISHED:\n",
        "    if False:\n",
    ),
    Mutant(
        "resync.resume-a-finished-run",
        CONTROL,
        """    if run.status in FINISHED:
        raise _finished(run_id, run.status, "resumed")
""",
        "",
    ),
    Mutant(
        "resync.cancel-leaves-items-pending",
        CONTROL,
        "    cancelled = await cancel_pending(session, run_id)\n",
        "    cancelled = 0\n",
    ),
    Mutant(
        "resync.finished-run-restarted",
        EXECUTION,
        "WHERE id = :run AND (status = 'queued'",
        "WHERE id = :run AND (status IS NOT NULL",
    ),
    Mutant(
        "resync.empty-run-not-finished",
        RESYNC,
        " AND NOT EXISTS (SELECT 1 FROM items)",
        " AND false",
    ),
    Mutant(
        "resync.attempts-not-counted",
        EXECUTION,
        "attempts = i.attempts + o.attempted",
        "attempts = o.attempted",
    ),
    # Who may do what.
    Mutant(
        "tokens.revoked-token-accepted",
        TOKENS,
        'LIVE_TOKEN = """t.revoked_at IS NULL AND (',
        'LIVE_TOKEN = """(',
    ),
    Mutant("orgs.members-are-managers", ORGS, "org.role in MANAGER_ROLES", "org.role in ROLES"),
    Mutant(
        "orgs.non-members-find-orgs",
        ORGS,
        "    if row is None or row.id is None or (row.role is None and not actor.is_platform_admin):"
        '\n        raise NotFound(f"organization',
        '    if row is None or row.id is None:\n        raise NotFound(f"organization',
    ),
    Mutant(
        "orgs.default-org-any-membership",
        ORGS,
        'where = "o.personal_owner_id = CAST(:actor AS uuid)"',
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
        "tokens.token-hash-not-compared",
        TOKENS,
        "if row is None or not hmac.compare_digest(row.token_hash, digest):",
        "if row is None:",
        equivalent="the row was found by `token_hash = :hash`, so the two digests are equal; the comparison is there for constant time, not for a different answer",
    ),
    # The merge and the diff (SQL functions created by a migration).
    Mutant(
        "merge.local-only-change-overwritten",
        MERGE,
        "IF there IS NOT DISTINCT FROM base THEN  -- only the org changed it\n            merged := here;",
        "IF there IS NOT DISTINCT FROM base THEN  -- only the org changed it\n            merged := there;",
    ),
    Mutant(
        "merge.release-only-change-ignored",
        MERGE,
        "IF here IS NOT DISTINCT FROM base THEN  -- only the release changed it, if anyone\n            merged := there;",
        "IF here IS NOT DISTINCT FROM base THEN  -- only the release changed it, if anyone\n            merged := here;",
    ),
    Mutant(
        "merge.equal-changes-conflict",
        MERGE,
        "IF there IS NOT DISTINCT FROM here THEN  -- both changed it the same way",
        "IF false THEN  -- both changed it the same way",
    ),
    Mutant(
        "merge.objects-atomic",
        MERGE,
        "IF jsonb_typeof(here) = 'object' AND jsonb_typeof(there) = 'object'",
        "IF false AND jsonb_typeof(there) = 'object'",
    ),
    Mutant(
        "merge.sets-atomic",
        MERGE,
        "IF as_set AND jsonb_typeof(here) = 'array'",
        "IF false AND jsonb_typeof(here) = 'array'",
    ),
    Mutant(
        "merge.set-removals-ignored",
        MERGE,
        "WHERE NOT (install_has(base, t.e) AND NOT install_has(here, t.e))",
        "WHERE true",
    ),
    Mutant(
        "merge.conflict-takes-the-release",
        MERGE,
        "            merged := here;\n            fields := install_outcome(at, 'conflict');",
        "            merged := there;\n            fields := install_outcome(at, 'conflict');",
    ),
    Mutant(
        "merge.conflicts-unreported",
        MERGE,
        "fields := install_outcome(at, 'conflict');",
        "fields := install_outcome(at, 'kept_local');",
    ),
    Mutant(
        "merge.tenant-policy-ignored",
        MERGE,
        "IF policy = 'tenant' THEN",
        "IF false THEN",
    ),
    Mutant(
        "merge.template-policy-ignored",
        MERGE,
        "ELSIF policy = 'template' OR base IS NULL THEN",
        "ELSIF base IS NULL THEN",
    ),
    Mutant(
        "merge.take-local-ignored",
        MERGE,
        "IF take = 'local' THEN",
        "IF false THEN",
    ),
    Mutant(
        "merge.take-template-ignored",
        MERGE,
        "ELSIF take = 'template' THEN",
        "ELSIF false THEN",
    ),
    Mutant(
        "merge.whole-item-resolution-ignored",
        MERGE,
        "CASE WHEN whole IS NULL THEN resolutions",
        "CASE WHEN true THEN resolutions",
    ),
    Mutant(
        "merge.overwritten-value-lost",
        MERGE,
        "THEN jsonb_build_object('local', coalesce(local, 'null'))",
        "THEN jsonb_build_object('local', 'null'::jsonb)",
    ),
    # The fields `install_merge` settles itself (migration 0017).
    Mutant(
        "merge.settled-local-change-overwritten",
        SETTLED,
        "-- only the org changed it\n                    v := h;",
        "-- only the org changed it\n                    v := t;",
    ),
    Mutant(
        "merge.settled-release-change-ignored",
        SETTLED,
        "-- only the release changed it, if anyone\n                    v := t;",
        "-- only the release changed it, if anyone\n                    v := h;",
    ),
    Mutant(
        "merge.settled-release-change-unreported",
        SETTLED,
        "                    v := t;\n                    IF t IS DISTINCT FROM b THEN\n                        f := install_outcome(at, 'merged');\n                    END IF;\n                ELSIF",
        "                    v := t;\n                    IF false THEN\n                        f := install_outcome(at, 'merged');\n                    END IF;\n                ELSIF",
    ),
    Mutant(
        "merge.settled-despite-a-resolution",
        SETTLED,
        "            ELSIF coalesce(resolutions ->> at, whole) IS NULL",
        "            ELSIF true",
    ),
    Mutant(
        "pointer.keys-not-escaped",
        MERGE,
        "RETURN path || '/' || replace(replace(key, '~', '~0'), '/', '~1')",
        "RETURN path || '/' || key",
    ),
    Mutant(
        "diff.equal-paths-listed",
        MERGE,
        "\n              AND (w.a_value -> k.key) IS DISTINCT FROM (w.b_value -> k.key))",
        ")",
    ),
    # Adopt, detach, rebase, reconcile, template enforcement, the fleet plan.
    Mutant(
        "plan.adopt-ignored",
        ENGINE,
        "WHEN m.adopting AND NOT m.ours THEN 'adopt'",
        "WHEN false THEN 'adopt'",
    ),
    Mutant(
        "plan.detached-rows-conflict",
        ENGINE,
        "WHEN m.detached THEN 'detached'",
        "WHEN false THEN 'detached'",
    ),
    Mutant(
        "apply.bases-never-moved",
        ENGINE,
        "    WHERE rebase.kind = '{kind}' AND t.organization_id = rebase.org AND t.slug = rebase.slug",
        "    WHERE false AND t.organization_id = rebase.org AND t.slug = rebase.slug",
    ),
    Mutant(
        "apply.merge-results-not-written",
        ENGINE,
        "_TARGET_ITEM = \"coalesce(m.item, i.item || '{}'::jsonb)\"",
        "_TARGET_ITEM = \"i.item || '{}'::jsonb\"",
    ),
    Mutant(
        "plan.reconcile-keeps-edits",
        ENGINE,
        "THEN 'tenant' ELSE 'template' END)",
        "THEN 'tenant' ELSE 'merge' END)",
    ),
    Mutant(
        "plan.template-fields-never-enforced",
        ENGINE,
        ":mirrored AND p.prev_release IS DISTINCT FROM CAST(:release AS uuid)\n               AS enforce_template",
        "false AS enforce_template",
    ),
    Mutant(
        "fleet.rows-the-release-changes-left-out",
        ENGINE,
        "AND o.managed_by = CAST(:owner AS uuid) AND n.hash = o.mirrored_hash\n",
        "AND o.managed_by = CAST(:owner AS uuid)\n",
    ),
    Mutant(
        "fleet.enforced-template-fields-left-out",
        ENGINE,
        "\n          AND NOT (n.enforces AND s.prev_release IS DISTINCT FROM CAST(:release AS uuid)),",
        ",",
    ),
    Mutant(
        "fleet.conflicts-unlisted",
        ENGINE,
        "    FROM planned WHERE action = 'conflict' GROUP BY org)",
        "    FROM planned WHERE false GROUP BY org)",
    ),
    Mutant(
        "install.unknown-items-accepted",
        ENGINE,
        "    if unknown:\n        raise Invalid(",
        "    if False:\n        raise Invalid(",
    ),
    Mutant(
        "install.history-loses-overwritten-values",
        ENGINE,
        '    if overwritten := planned.overwritten():\n        changes["overwritten"] = overwritten\n',
        "",
    ),
    Mutant(
        "detach.provenance-kept",
        REPAIR,
        "UPDATE {table} SET managed_by_template_agent_id = NULL,",
        "UPDATE {table} SET managed_by_template_agent_id = managed_by_template_agent_id,",
    ),
    Mutant(
        "reconcile.dry-run-writes",
        REPAIR,
        "        dry_run=dry_run,\n        locked=True,",
        "        dry_run=False,\n        locked=True,",
    ),
    # Tokens and people.
    Mutant(
        "tokens.expired-token-accepted",
        TOKENS,
        "(t.expires_at IS NULL OR t.expires_at > now())\n",
        "(true)\n",
    ),
    Mutant(
        "tokens.deactivated-user-accepted",
        TOKENS,
        '    AND u.deactivated_at IS NULL"""  # noqa: S105',
        '    AND true"""  # noqa: S105',
    ),
    Mutant(
        "tokens.any-users-token-revoked",
        TOKENS,
        "WHERE id = :id AND (:any_user OR user_id = CAST(:actor AS uuid))",
        "WHERE id = :id",
    ),
    Mutant(
        "tokens.expiry-in-the-past-accepted",
        TOKENS,
        "        if expires_at <= datetime.now(UTC):",
        "        if False:",
    ),
    Mutant(
        "orgs.last-owner-removable",
        ORGS,
        "    if owners <= 1:",
        "    if owners < 1:",
    ),
    Mutant(
        "orgs.membership-changes-not-serialized",
        ORGS,
        '    await session.execute(\n        text("SELECT 1 FROM organizations WHERE id = :org FOR NO KEY UPDATE"),\n        {"org": organization_id},\n    )',
        "    return",
    ),
    Mutant(
        "orgs.last-admin-deactivatable",
        ORGS,
        "        if not others:",
        "        if False:",
    ),
    Mutant(
        "orgs.admin-api-makes-personal-orgs",
        ORGS,
        '    if kind != "team":',
        "    if False:",
    ),
    Mutant(
        "orgs.previous-admin-token-kept",
        ORGS,
        "\n              AND token_hash IS DISTINCT FROM CAST(:hash AS text)",
        "\n              AND false",
    ),
    # An organization's own schema: who may write, what a write checks, what it records.
    Mutant(
        "schema.if-match-ignored",
        SCHEMA,
        "    if not etag_matches(if_match, item.etag):",
        "    if False:",
    ),
    Mutant(
        "schema.weak-etag-matches",
        SCHEMA,
        'for tag in tags if not tag.startswith("W/"))',
        'for tag in [t.removeprefix("W/") for t in tags])',
    ),
    Mutant("schema.member-may-write", SCHEMA, "    require_manager(actor, org)\n", ""),
    Mutant("schema.template-org-writable", SCHEMA, "    if is_template:", "    if False:"),
    Mutant(
        "schema.version-not-appended",
        SCHEMA,
        "    WHERE NOT EXISTS (SELECT 1 FROM current c",
        "    WHERE false AND NOT EXISTS (SELECT 1 FROM current c",
    ),
    Mutant(
        "schema.version-appended-when-unchanged",
        SCHEMA,
        "    WHERE NOT EXISTS (SELECT 1 FROM current c",
        "    WHERE true OR NOT EXISTS (SELECT 1 FROM current c",
    ),
    Mutant("schema.version-off-by-one", SCHEMA, "), 0) + 1,", "), 0) + 2,"),
    Mutant(
        "schema.new-version-not-current",
        SCHEMA,
        "UPDATE {table} SET current_version_id = a.id",
        "UPDATE {table} SET current_version_id = {table}.current_version_id",
    ),
    Mutant(
        "schema.edit-not-recorded",
        SCHEMA,
        '    await _record(session, actor, org, item, "updated", partners=partners, previous=current)\n',
        "",
    ),
    Mutant(
        "schema.edit-recorded-as-created",
        SCHEMA,
        '    "updated": "schema.item_updated",',
        '    "updated": "schema.item_created",',
    ),
    Mutant(
        "schema.archived-item-edited", SCHEMA, '    if current.status != "active":', "    if False:"
    ),
    Mutant(
        "schema.slug-changes",
        SCHEMA,
        'patched.get("slug") != slug',
        "False",
    ),
    Mutant(
        "schema.unchanged-content-written",
        SCHEMA,
        "    if content == current.document:",
        "    if False:",
    ),
    Mutant(
        "schema.schedule-not-set-again",
        SCHEMA,
        '    if kind == "watchers":\n        await watcher_schedules.schedule(session, org.id)',
        "    if False:\n        await watcher_schedules.schedule(session, org.id)",
    ),
    Mutant(
        "schema.inverse-not-paired",
        SCHEMA,
        "      AND inverse_type_id IS NULL AND id <> CAST(:id AS uuid)",
        "      AND false",
    ),
    Mutant(
        "schema.references-to-archived-items",
        SCHEMA,
        "FROM entity_types WHERE organization_id = CAST(:org AS uuid) AND status = 'active'",
        "FROM entity_types WHERE organization_id = CAST(:org AS uuid)",
    ),
    Mutant(
        "schema.references-into-other-orgs",
        SCHEMA,
        "FROM watchers WHERE organization_id = CAST(:org AS uuid) AND status = 'active'",
        "FROM watchers WHERE status = 'active'",
    ),
    Mutant(
        "schema.other-orgs-items-listed",
        SCHEMA,
        "WHERE r.organization_id = CAST(:org AS uuid) AND r.slug NOT LIKE '$%'",
        "WHERE r.slug NOT LIKE '$%'",
    ),
    Mutant(
        "schema.system-rows-listed",
        SCHEMA,
        "WHERE r.organization_id = CAST(:org AS uuid) AND r.slug NOT LIKE '$%'",
        "WHERE r.organization_id = CAST(:org AS uuid)",
    ),
    Mutant(
        "schema.edited-when-equal-to-the-release",
        SCHEMA,
        "           AND {ETAG} IS DISTINCT FROM r.mirrored_hash AS edited",
        "           AS edited",
    ),
    Mutant(
        "schema.write-finds-another-orgs-row",
        SCHEMA,
        'text(f"SELECT id FROM {engine.TABLES[kind]} WHERE organization_id = :org AND slug = :slug"),',
        'text(f"SELECT id FROM {engine.TABLES[kind]} WHERE slug = :slug ORDER BY created_at"),',
    ),
    Mutant("schema.referred-item-archived", SCHEMA, "    if users:", "    if False:"),
    Mutant(
        "schema.managed-item-archived",
        SCHEMA,
        '    if current.provenance.type == "managed":',
        "    if False:",
    ),
    Mutant(
        "schema.write-not-verified",
        SCHEMA,
        "    if item.document != content:",
        "    if False:",
        equivalent="the check guards against a reference made unresolvable by a concurrent "
        "transaction; the organization's schema lock keeps every other schema write out, and "
        "validation and the write read the same rows, so no test can reach it",
    ),
    # Item validation, as an organization writes one item.
    Mutant(
        "documents.item-policies-accepted",
        DOCUMENTS,
        "        if item.policies:",
        "        if False:",
    ),
    Mutant(
        "documents.inverse-pairs-with-a-taken-one",
        DOCUMENTS,
        "not (pairs_free_inverse and partner[0] is None)",
        "not pairs_free_inverse",
    ),
    # Plans as answered: conflict counts and line diffs.
    Mutant("plans.conflicts-not-counted", PLANS, "conflict=conflicts[kind]", "conflict=0"),
    Mutant(
        "plans.conflict-diffs-dropped",
        PLANS,
        '                conflict["diffs"] = diffs',
        "                pass",
    ),
    Mutant(
        "plans.diff-against-itself",
        PLANS,
        "        textdiff.at_pointer(release, path),",
        "        textdiff.at_pointer(current, path),",
    ),
    Mutant(
        "plans.dry-run-says-no-conflict",
        INSTALLS,
        "        would_conflict=bool(planned.conflicts),",
        "        would_conflict=False,",
    ),
    Mutant(
        "plans.reconcile-dry-run-hides-conflicts",
        REPAIR,
        "            conflicts=len(planned.conflicts),",
        "            conflicts=0,",
    ),
    Mutant(
        "textdiff.one-line-text-diffed",
        TEXTDIFF,
        '    if "\\n" not in before and "\\n" not in after:\n        return None\n',
        "",
    ),
    # The change feed: one event per change, listing what changed, with watchers scheduled.
    Mutant("events.adopted-items-not-listed", OUTBOX, '    "adopt": "adopted",\n', ""),
    Mutant(
        "events.item-versions-from-any-org",
        OUTBOX,
        "WHERE i.kind = 'watchers' AND w.organization_id = s.organization_id AND w.slug = i.slug",
        "WHERE i.kind = 'watchers' AND w.slug = i.slug",
    ),
    Mutant(
        "events.adopted-watchers-not-scheduled",
        ENGINE,
        "CASE WHEN action IN ('create', 'update', 'adopt')\n            THEN coalesce(merge -> 'item' ->> 'schedule', new_schedule)",
        "CASE WHEN action IN ('create', 'update')\n            THEN coalesce(merge -> 'item' ->> 'schedule', new_schedule)",
    ),
    Mutant(
        "events.written-watchers-not-scheduled",
        ENGINE,
        "        schedules=next_runs([o.plan for o in writing]),",
        "        schedules=None,",
    ),
    Mutant(
        "events.detach-lists-nothing",
        REPAIR,
        'items=[outbox.Item(kind=kind, slug=slug, action="detached")],',
        "items=[],",
    ),
    Mutant(
        "events.unchanged-publish-emits",
        TEMPLATES,
        "    if created:\n        await outbox.emit(",
        "    if True:\n        await outbox.emit(",
    ),
    # Long polls that re-check access, detachments kept per template, organization references
    # resolved without a cast, cursors the database can take, strict bodies, bounded waits for
    # busy installs, release diffs of the template itself, pipes, wording, who sees emails.
    Mutant(
        "poll.access-checked-once",
        FEED_API,
        "        current = await current_actor(session, actor)\n",
        "        current = actor\n",
    ),
    Mutant(
        "poll.admin-not-rechecked",
        FEED_API,
        "        if admin:\n            require_admin(current)\n",
        "        if False:\n            require_admin(current)\n",
    ),
    Mutant(
        "poll.membership-not-rechecked",
        FEED_API,
        "        if org_ref is not None:  # slugs never change",
        "        if False:  # slugs never change",
    ),
    Mutant(
        "poll.token-liveness-not-rechecked",
        TOKENS,
        "OR t.id IS NOT NULL AND {LIVE_TOKEN})",
        "OR t.id IS NOT NULL AND u.deactivated_at IS NULL)",
    ),
    Mutant(
        "poll.admin-flag-from-the-start",
        TOKENS,
        "        is_platform_admin=row.is_platform_admin,\n        token_id=actor.token_id,",
        "        is_platform_admin=actor.is_platform_admin,\n        token_id=actor.token_id,",
    ),
    Mutant(
        "detach.writing-clears-every-template",
        ENGINE,
        '"array_remove(t.detached_from_template_agent_ids, CAST(:owner AS uuid))"',
        '"ARRAY[]::uuid[]"',
    ),
    Mutant(
        "detach.only-while-nobody-manages-it",
        ENGINE,
        "               AND j.managed_by IS DISTINCT FROM CAST(:owner AS uuid)\n",
        "               AND j.managed_by IS NULL\n",
    ),
    Mutant(
        "detach.asked-adopt-of-anothers-row-skipped",
        ENGINE,
        "               AND NOT (j.managed_by IS NOT NULL\n"
        "                        AND j.kind || ':' || j.slug = ANY(CAST(:adopt AS text[])))\n",
        "",
    ),
    Mutant(
        "drift.detached-only-while-unmanaged",
        ENGINE,
        "             AND CAST(:owner AS uuid) = ANY(d.detached_from)))",
        "             AND CAST(:owner AS uuid) = ANY(d.detached_from) AND d.managed_by IS NULL))",
    ),
    Mutant(
        "detach.again-refused-once-adopted-elsewhere",
        REPAIR,
        "AND managed_by_template_agent_id IS DISTINCT FROM :owner",
        "AND managed_by_template_agent_id IS NULL",
    ),
    Mutant(
        "detach.forgets-earlier-templates",
        REPAIR,
        "array_append(\n                            array_remove(detached_from_template_agent_ids, :owner), :owner)",
        "ARRAY[CAST(:owner AS uuid)]",
    ),
    Mutant(
        "invariants.only-first-detachment-counts",
        INVARIANTS,
        "CROSS JOIN unnest(detached_from_template_agent_ids) AS d(template_agent_id)",
        "CROSS JOIN LATERAL (SELECT detached_from_template_agent_ids[1]) AS d(template_agent_id)",
    ),
    Mutant(
        "refs.id-lookalike-slug-names-the-id",
        ORGS,
        "ORDER BY r.ref, o.slug = r.ref DESC",
        "ORDER BY r.ref, o.slug = r.ref ASC",
    ),
    Mutant(
        "refs.unknown-organizations-accepted",
        ORGS,
        "found = {row.ref: row.id for row in rows if row.id is not None}",
        "found = {row.ref: row.id for row in rows}",
    ),
    Mutant(
        "cursor.times-without-zone",
        PAGINATION,
        "    datetime: Annotated[datetime, msgspec.Meta(tz=True)],",
        "    datetime: datetime,",
    ),
    Mutant("cursor.integers-unbounded", PAGINATION, "    int: Int8,", "    int: int,"),
    Mutant(
        "cursor.int4-as-int8",
        PAGINATION,
        "Int4 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]",
        "Int4 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]",
    ),
    Mutant(
        "cursor.utc-overflow-unchecked",
        PAGINATION,
        "        value.astimezone(UTC)  # OverflowError",
        "        pass  # OverflowError",
    ),
    Mutant(
        "cursor.nul-in-strings",
        PAGINATION,
        '    str: Annotated[str, msgspec.Meta(pattern="^[^\\x00]*$")],',
        "    str: str,",
    ),
    Mutant(
        "body.strings-read-as-numbers",
        DEPS,
        "msgspec.convert(value, body.annotation, strict=True)",
        "msgspec.convert(value, body.annotation, strict=False)",
    ),
    Mutant(
        "resync.busy-installs-not-noticed",
        RESYNC,
        "    busy = [s for s in installs if s.install_id not in held]",
        "    busy: list[fleet.Selected] = []",
    ),
    Mutant(
        "resync.busy-installs-waited-for-unbounded",
        RESYNC,
        '{"wait": f"{BUSY_WAIT_SECONDS}s"},',
        '{"wait": "0"},',
    ),
    Mutant(
        "console.halted-wave-is-the-next",
        CONSOLE_RUNS,
        "w.wave < run.current_wave and w.total",
        "w.wave <= run.current_wave and w.total",
    ),
    Mutant(
        "diff.template-paths-include-items",
        ENGINE,
        "CROSS JOIN LATERAL install_diff(a.snapshot - CAST(:kinds AS text[]),",
        "CROSS JOIN LATERAL install_diff(a.snapshot,",
    ),
    Mutant(
        "diff.template-paths-old-and-new-swapped",
        ENGINE,
        "SELECT d.path, d.a_value AS old, d.b_value AS new\nFROM template_releases a",
        "SELECT d.path, d.b_value AS old, d.a_value AS new\nFROM template_releases a",
    ),
    Mutant(
        "diff.template-paths-not-reported",
        TEMPLATES,
        "            template_paths = await engine.template_diff(session, previous, result.release_id)\n",
        "",
    ),
    Mutant(
        "cli.pipes-cut-at-80",
        CLI_OUTPUT,
        'if self.is_terminal or os.environ.get("COLUMNS", "").isdigit():',
        "if True:",
    ),
    Mutant(
        "cli.columns-ignored-in-pipes",
        CLI_OUTPUT,
        'if self.is_terminal or os.environ.get("COLUMNS", "").isdigit():',
        "if self.is_terminal:",
    ),
    Mutant(
        "webhooks.refusal-names-no-setting",
        ADDRESSES,
        'f"{detail} (to send webhooks to local and private addresses, as local runners "\n'
        '            f"and tests do, start the service with {ALLOW_PRIVATE_WEBHOOKS}=true)",',
        "detail,",
    ),
    Mutant(
        "words.patterns-shown-as-regex",
        ERRORS,
        "    return _MATCHING.sub(",
        "    return message or _MATCHING.sub(",
    ),
    Mutant(
        "emails.members-see-them",
        ACTOR,
        "return actor.is_platform_admin or role in MANAGER_ROLES",
        "return actor.is_platform_admin or role is not None",
    ),
    Mutant(
        "emails.own-address-hidden",
        ORGS,
        "email=shown or r.user_id == actor.user_id",
        "email=shown",
    ),
    Mutant(
        "emails.pinned-by-shown-to-all",
        INSTALLS,
        'pinned_by=found["pinned_by"] if sees_emails(actor, found["role"]) else None,',
        'pinned_by=found["pinned_by"],',
    ),
    # Batches: each org's outcome its own.
    Mutant(
        "batch.conflicting-org-written",
        ENGINE,
        'status = {"unchanged": "unchanged", "conflict": "conflict"}.get(predicted, "written")',
        'status = {"unchanged": "unchanged"}.get(predicted, "written")',
    ),
    Mutant(
        "batch.failed-batch-not-split",
        ENGINE,
        "        half = len(writing) // 2\n",
        '        return [dataclasses.replace(o, status="failed", error=exc) if o.status == "written" else o for o in decided]\n        half = len(writing) // 2\n',
    ),
    Mutant(
        "batch.events-to-one-org",
        ENGINE,
        "    SELECT d.n, u.organization_id, d.install AS install_id, d.event_type AS type,",
        "    SELECT d.n, (SELECT max(organization_id) FROM updated) AS organization_id, d.install AS install_id, d.event_type AS type,",
    ),
    Mutant(
        "batch.created-installs-kept-when-unwritten",
        ENGINE,
        '    unwritten = [o.install.id for o in outcomes if o.created and o.status != "written"]',
        "    unwritten = []",
    ),
    Mutant(
        "batch.busy-install-holds-the-batch",
        EXECUTION,
        'CLAIM_SQL = _claim_sql("SKIP LOCKED")',
        'CLAIM_SQL = _claim_sql("")',
    ),
    Mutant(
        "hash.raw-inserts-not-hashed",
        CONTENT,
        "            IF TG_OP = 'INSERT' THEN\n                {_rehash(table, inserted)}",
        "            IF TG_OP = 'INSERT' THEN\n                NULL;",
    ),
    Mutant(
        "bulk.install-items-skipped-as-uninstalled",
        EXECUTION,
        "        if item.installs:  # the engine creates the install",
        "        if False:  # the engine creates the install",
    ),
    Mutant(
        "bulk.dry-run-says-upgrade",
        FLEET,
        '        if s.installs and outcome == "upgrade":\n            outcome = "install"',
        '        if False:\n            outcome = "install"',
    ),
    # Webhook lanes: leased, sent and recorded in batches, each lane in order, at least once.
    Mutant(
        "webhooks.lease-ignores-lane-order",
        LANES,
        "        ORDER BY d.event_txid, d.event_seq\n        LIMIT 1) h),",
        "        ORDER BY d.event_txid DESC, d.event_seq DESC\n        LIMIT 1) h),",
    ),
    Mutant(
        "webhooks.lease-ignores-the-horizon",
        LANES,
        "ARRAY(SELECT id FROM head WHERE settled)",
        "ARRAY(SELECT id FROM head)",
    ),
    Mutant(
        "webhooks.recorded-delivery-still-a-head",
        LANES,
        " AND d.id NOT IN (SELECT delivery_id FROM outcome)",
        "",
    ),
    Mutant(
        "webhooks.retrying-lane-leased-in-its-statement",
        LANES,
        "    WHERE retrying.endpoint_id IS NULL),",
        "    WHERE true),",
    ),
    Mutant(
        "webhooks.lease-takes-a-leased-head",
        LANES,
        "      AND (d.leased_until IS NULL OR d.leased_until <= now())\n      AND EXISTS",
        "      AND EXISTS",
    ),
    Mutant(
        "webhooks.lease-ignores-disabled-endpoints",
        LANES,
        "      AND EXISTS (SELECT FROM webhook_endpoints w WHERE w.id = d.endpoint_id AND w.enabled)\n",
        "",
    ),
    Mutant(
        "webhooks.outcomes-recorded-on-other-deliveries",
        LANES,
        '"deliveries": [a.delivery_id for a in attempts],',
        '"deliveries": [a.delivery_id for a in reversed(attempts)],',
    ),
    Mutant(
        "webhooks.failure-does-not-back-off",
        LANES,
        "ELSE now() + make_interval(secs => o.retry_in) END,",
        "ELSE now() END,",
    ),
    Mutant(
        "webhooks.success-keeps-the-failure-count",
        LANES,
        "CASE WHEN p.last_success IS NULL THEN w.consecutive_failures + p.failures",
        "CASE WHEN true THEN w.consecutive_failures + p.failures",
    ),
    Mutant(
        "webhooks.given-up-an-attempt-late",
        LANES,
        "WHEN d.attempts >= :max THEN 'failed'",
        "WHEN d.attempts > :max THEN 'failed'",
    ),
    Mutant(
        "webhooks.disabled-a-failure-late",
        LANES,
        "enabled = w.enabled AND f.failures < :max,",
        "enabled = w.enabled AND f.failures <= :max,",
    ),
    Mutant(
        "webhooks.only-200-a-success",
        LANES,
        "return self.status_code is not None and 200 <= self.status_code < 300",
        "return self.status_code == 200",
    ),
    Mutant(
        "webhooks.endpoint-share-ignored",
        DISPATCHER,
        "free = self.settings.connections_per_endpoint - self._requests[endpoint]",
        "free = LEASE_BATCH",
    ),
    Mutant(
        "webhooks.notification-not-heard",
        DISPATCHER,
        "        self._make_ready(lane)\n        self._wake.set()\n\n    def look_everywhere",
        "        self._wake.set()\n\n    def look_everywhere",
    ),
    Mutant(
        "webhooks.leases-kept-when-cancelled",
        DISPATCHER,
        "                await lanes.release(conn, list(self._flying.values()))\n",
        "",
    ),
    Mutant(
        "webhooks.stop-abandons-requests-in-flight",
        JOBS,
        "        dispatcher.stop()\n        await dispatching\n",
        "",
    ),
    Mutant(
        "webhooks.connections-left-open-at-stop",
        DISPATCHER,
        "        for connections, _ in self._clients.values():\n            await connections.aclose()\n",
        "",
    ),
    # The HTTP client: what is signed, which connections are reused, what is sent again.
    Mutant(
        "webhooks.signed-over-the-event-not-the-body",
        DELIVERY,
        "timestamp=at, data=body.decode())",
        "timestamp=at, data=msgspec.json.encode(event).decode())",
    ),
    Mutant(
        # Either state check alone is enough: h11 moves both sides to MUST_CLOSE when the
        # response says the connection closes.
        "webhooks.reused-after-the-receiver-said-close",
        DELIVERY,
        "            or protocol.our_state is not h11.DONE\n"
        "            or protocol.their_state is not h11.DONE\n",
        "",
    ),
    Mutant(
        "webhooks.response-body-read-without-bound",
        DELIVERY,
        "                if read > MAX_RESPONSE_BYTES:\n",
        "                if False:\n",
    ),
    Mutant(
        "webhooks.resent-after-the-response-began",
        DELIVERY,
        "connection.answered = connection.answered or bool(data)",
        "connection.answered = False",
    ),
    Mutant(
        "webhooks.resent-on-a-fresh-connection",
        DELIVERY,
        "if reused is None or connection.answered:",
        "if connection.answered:",
    ),
    Mutant(
        "webhooks.stale-connections-kept",
        DELIVERY,
        "                kept.append(connection)\n            else:\n                connection.close()\n",
        "                kept.append(connection)\n",
    ),
    Mutant(
        "webhooks.late-record-settles-another-lease",
        LANES,
        "      AND (o.redelivery OR d.attempts = o.attempt)\n",
        "",
    ),
    Mutant(
        "webhooks.address-not-checked-at-delivery",
        DELIVERY,
        "pinned_address(target, allow_private=settings.allow_private)",
        "pinned_address(target, allow_private=True)",
    ),
    Mutant(
        "webhooks.enable-wakes-no-lane",
        WEBHOOKS,
        "                    SELECT {NOTIFY_LANE}\n",
        "                    SELECT 1\n",
    ),
    Mutant(
        "webhooks.redelivery-wakes-no-lane",
        WEBHOOKS,
        "SELECT {NOTIFY_LANE} FROM due",
        "SELECT 1 FROM due",
    ),
    Mutant(
        "webhooks.new-event-wakes-no-lane",
        LANE_TRIGGER,
        "            PERFORM pg_notify('install_service_webhooks',\n"
        "                              lane.endpoint_id || ' ' || NEW.organization_id);\n",
        "            NULL;\n",
    ),
    # Template dependencies (contract §13).
    Mutant(
        "requirements.never-missing",
        ENGINE,
        "WHERE NOT coalesce(f.status = 'active' AND ir.version >= coalesce(r.min_version, 1), "
        "false)",
        "WHERE false",
    ),
    Mutant(
        "requirements.minimum-ignored",
        ENGINE,
        "ir.version >= coalesce(r.min_version, 1)",
        "ir.version >= 1",
    ),
    Mutant(
        "requirements.uninstalled-requirement-counts",
        ENGINE,
        "WHERE NOT coalesce(f.status = 'active' AND ir.version",
        "WHERE NOT coalesce(ir.version",
    ),
    Mutant(
        "requirements.found-installs-not-locked",
        ENGINE,
        'lock="FOR SHARE" if lock else ""',
        'lock=""',
    ),
    Mutant(
        "requirements.batch-keeps-requirements-of-refused-orgs",
        ENGINE,
        "        await savepoint.rollback()\n        refused.update(blocked)",
        "        await savepoint.commit()\n        refused.update(blocked)",
    ),
    Mutant(
        "requirements.batch-orgs-missing-written",
        ENGINE,
        "if i.organization_id in missing and not with_requirements\n",
        "if False\n",
    ),
    Mutant(
        "required-by.dropped-item-archived",
        ENGINE,
        "               WHEN m.new_hash IS NULL AND m.required_by IS NOT NULL THEN 'conflict'\n",
        "",
    ),
    Mutant(
        "required-by.any-orgs-dependents",
        ENGINE,
        "WHERE d.organization_id = j.org AND d.status = 'active'",
        "WHERE d.status = 'active'",
    ),
    Mutant(
        "required-by.uninstalled-dependents-hold",
        ENGINE,
        "WHERE d.organization_id = j.org AND d.status = 'active'",
        "WHERE d.organization_id = j.org",
    ),
    Mutant(
        "requirements.merge-sees-qualified-references",
        ENGINE,
        "CASE WHEN n.item IS NOT NULL THEN install_unqualified(c.kind, n.item) END",
        "CASE WHEN n.item IS NOT NULL THEN n.item END",
    ),
    Mutant(
        "requirements.qualified-resolved-in-the-org-for-templates",
        ENGINE,
        "AND (:mirrored OR strpos({slug}, ':') = 0)),",
        "),",
    ),
    Mutant(
        "requirements.template-org-compared-unqualified",
        ENGINE,
        '_ITEM_HASH = "CASE WHEN :mirrored THEN i.content_hash ELSE install_content_hash(i.item) END"',
        '_ITEM_HASH = "i.content_hash"',
    ),
    Mutant(
        "requirements.release-items-hashed-qualified",
        REQUIREMENTS,
        '_items_of("install_unqualified(k.kind, i.item)")',
        '_items_of("i.item")',
    ),
    Mutant(
        "uninstall.required-by-unchecked",
        INSTALLS,
        "if dependents and not cascade:",
        "if False:",
    ),
    Mutant(
        "uninstall.cascade-leaves-dependents",
        INSTALLS,
        "            await uninstall(session, actor, dependent.id, cascade=True)",
        "            pass",
    ),
    Mutant(
        "publish.qualified-references-unchecked",
        TEMPLATES,
        "                    if symmetric is None:",
        "                    if False:",
    ),
    Mutant(
        "publish.collisions-with-requirements-unchecked",
        TEMPLATES,
        "for template in sorted(owners.get((kind, item.slug), ())):",
        "for template in ():",
    ),
    Mutant(
        "publish.cycles-unchecked",
        TEMPLATES,
        "    problems.extend(await _cycles(session, document))\n",
        "",
    ),
    Mutant(
        "publish.minimum-not-checked",
        TEMPLATES,
        "        elif row.min_version is not None and row.min_id is None:",
        "        elif False:",
    ),
    Mutant(
        "documents.qualifier-outside-requires",
        DOCUMENTS,
        "    elif template not in known.requires:",
        "    elif False:",
    ),
    Mutant(
        "fleet.dry-run-ignores-requirements",
        FLEET,
        "        if s.organization_id in unmet:",
        "        if False:",
    ),
    Mutant(
        "execution.run-without-its-requirements",
        EXECUTION,
        "with_requirements=first.with_requirements,",
        "with_requirements=False,",
    ),
    # A batch plans what the release moves and the rows not as installed (migration 0016).
    Mutant(
        "moved.edited-rows-not-looked-at",
        MOVED,
        '    "OR content_hash IS DISTINCT FROM mirrored_hash) "\n',
        '    ") "\n',
    ),
    Mutant(
        "moved.archived-rows-not-looked-at",
        MOVED,
        "IS NOT NULL AND (status <> 'active' \"\n",
        'IS NOT NULL AND (false "\n',
    ),
    Mutant(
        "moved.detached-rows-not-marked",
        MOVED,
        '    "OR cardinality(detached_from_template_agent_ids) > 0"\n)',
        '    "OR false"\n)',
    ),
    Mutant(
        "moved.detached-rows-not-looked-at",
        ENGINE,
        "       OR CAST(:owner AS uuid) = ANY(t.detached_from_template_agent_ids)",
        "       OR false",
    ),
    Mutant(
        "moved.deleted-rows-not-looked-at",
        ENGINE,
        "ON d.organization_id = s.org AND d.template_agent_id = CAST(:owner AS uuid)",
        "ON false AND d.template_agent_id = CAST(:owner AS uuid)",
    ),
    Mutant(
        "moved.dropped-items-not-planned",
        ENGINE,
        "      AND NOT EXISTS (SELECT 1 FROM new n WHERE n.kind = b.kind AND n.slug = b.slug)),",
        "      AND false),",
    ),
    Mutant(
        "moved.added-items-not-planned",
        ENGINE,
        "    WHERE b.content_hash IS DISTINCT FROM n.hash\n",
        "    WHERE b.content_hash <> n.hash\n",
    ),
    Mutant(
        "moved.new-installs-paired-with-moved-items-only",
        ENGINE,
        "    SELECT * FROM scope WHERE NOT install_active OR prev_release IS NULL),",
        "    SELECT * FROM scope WHERE prev_release IS NULL),",
    ),
    Mutant(
        "moved.edited-rows-planned-untouched",
        ENGINE,
        "      AND NOT EXISTS (SELECT 1 FROM unlike u\n                      WHERE u.org = s.org",
        "      AND NOT EXISTS (SELECT 1 FROM unlike u\n                      WHERE false AND u.org = s.org",
    ),
    Mutant(
        "moved.untouched-rows-written-unchecked",
        ENGINE,
        "SELECT u.org, u.kind, u.slug, 'update', NULL, NULL, NULL, NULL, u.prev_hash, NULL, n.schedule",
        "SELECT u.org, u.kind, u.slug, 'update', NULL, NULL, NULL, NULL, NULL, NULL, n.schedule",
    ),
    Mutant(
        "moved.deletion-trigger-skips-a-kind",
        MOVED,
        '        op.execute(f"""\n            CREATE FUNCTION install_deleted_{table}()',
        '        if kind != \'relationship_types\':\n            continue\n        op.execute(f"""\n            CREATE FUNCTION install_deleted_{table}()',
    ),
    # The fleet plan's answer, and how it is planned (2026-12-06, night).
    Mutant(
        "fleet.conflicting-orgs-counted-writing",
        ENGINE,
        "              HAVING bool_or(action IN {WRITES})) w) AS writing,",
        "              ) w) AS writing,",
    ),
    Mutant(
        "fleet.left-to-generic-plans",
        ENGINE,
        "    await session.execute(statement(_CUSTOM_PLANS))\n    answer = (",
        "    answer = (",
    ),
    # The merge reads each item once (migration 0019).
    Mutant(
        "merge.read-once-forgets-the-orgs-fields",
        READ_ONCE,
        """                     FROM jsonb_object_keys(coalesce(base, '{}') || coalesce(there, '{}')
                                            || coalesce(here, '{}')) AS keys(x)""",
        """                     FROM jsonb_object_keys(coalesce(base, '{}') || coalesce(there, '{}'))
                                            AS keys(x)""",
    ),
    Mutant(
        "merge.read-once-replaces-the-base",
        READ_ONCE,
        "        base := base || '{}';\n",
        "        base := coalesce(base, '{}');\n",
    ),
    # The dry run's page and outcomes, and the discarded listener (written from the code).
    Mutant(
        "fleet.page-ordered-without-its-wave",
        FLEET,
        "        return d[0].wave, d[0].organization_id\n",
        "        return 0, d[0].organization_id\n",
    ),
    Mutant(
        "fleet.predicted-without-conflicts",
        FLEET,
        "            found is not None,\n        ]",
        "            False,\n        ]",
    ),
    # The feed's horizon: this database's oldest running transaction, no other database's.
    Mutant(
        "feed.horizon-server-wide",
        FEED,
        "        pg_snapshot_xmax(pg_current_snapshot()),\n",
        "        pg_snapshot_xmin(pg_current_snapshot()),\n",
    ),
    Mutant(
        "feed.horizon-passes-this-databases-transactions",
        FEED,
        "WHERE a.backend_xid = xid(x) AND a.datname <> current_database())),",
        "WHERE a.backend_xid = xid(x))),",
    ),
    Mutant(
        "feed.horizon-passes-the-readers-own-transaction",
        FEED,
        "        pg_current_xact_id_if_assigned(),\n",
        "",
    ),
    # The feed's horizon, written blind, from the code alone.
    # Feed: the database filter turned around. This database's transactions are skipped
    # (events commit behind the cursor and are lost), and other databases' transactions
    # hold the feed back.
    Mutant(
        "blind.feed-horizon-database-filter-inverted",
        FEED,
        "a.datname <> current_database()",
        "a.datname = current_database()",
    ),
    # Feed: "held by a session of this database" used instead of "not held by a session of
    # another database". It matches the original for every session pg_stat_activity shows,
    # but a running xid it cannot place (session gone, not in the transaction's cached
    # pg_stat_activity snapshot) no longer holds the horizon.
    Mutant(
        "blind.feed-horizon-unplaced-transaction-passed",
        FEED,
        "WHERE NOT EXISTS (SELECT FROM pg_stat_activity a\n"
        "                           WHERE a.backend_xid = xid(x)"
        " AND a.datname <> current_database())),",
        "WHERE EXISTS (SELECT FROM pg_stat_activity a\n"
        "                           WHERE a.backend_xid = xid(x)"
        " AND a.datname = current_database())),",
    ),
    # Feed: least/greatest swapped. greatest() skips a NULL and min(xip) < xmax, so the
    # horizon is always xmax and running transactions hold nothing back. Readers (and
    # lanes, which share HORIZON) go past events that have not committed yet.
    Mutant(
        "blind.feed-horizon-greatest",
        FEED,
        "(SELECT CAST(CAST(least(",
        "(SELECT CAST(CAST(greatest(",
    ),
    # Feed read: the (txid, seq) keyset split into one test per column. Resuming from a
    # cursor skips a later-txid event whose seq is lower (a later transaction that inserted
    # first and committed last, held back behind the horizon until then).
    Mutant(
        "blind.feed-keyset-compared-per-column",
        FEED,
        "      AND (e.txid, e.seq) > (:after_0, :after_1)\n",
        "      AND e.txid >= :after_0 AND e.seq > :after_1\n",
    ),
    # Lanes: the lease statement uses the bare snapshot xmin instead of HORIZON.
    # Transactions of other databases then hold webhook deliveries back (the feed is fine).
    Mutant(
        "blind.lanes-horizon-server-wide",
        LANES,
        "horizon AS (SELECT {HORIZON} AS txid),",
        "horizon AS (SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot())"
        " AS text) AS bigint) AS txid),",
    ),
    # Lanes: an unsettled lane is reported held to head txid + 1. The dispatcher releases it
    # only when the horizon is above txid + 1. After the blocking transaction ends on a quiet
    # server the horizon is xmax = txid + 1, so the lane waits until some other xid completes
    # or the 60 s sweep, not a few ms.
    Mutant(
        "blind.lanes-unsettled-held-one-past",
        LANES,
        "            leases.unsettled.append((row.head_txid, lane))\n",
        "            leases.unsettled.append((row.head_txid + 1, lane))\n",
    ),
    Mutant(
        "events.discarded-listener-wakes-its-readers",
        LISTENER,
        "                if discarded:\n",
        "                if False:\n",
    ),
    # The no-op answered outside a transaction, and the one-statement install context
    # (written blind, from the code alone).
    # The no-op check's join (written blind, from the code alone).
    # An archived row with the item's hash passes for its mirror: re-installing would restore
    # it, yet the quick path answers "unchanged".
    Mutant(
        "blind.unchanged-archived-rows-mirror",
        ENGINE,
        "              AND t.status = 'active' AND t.slug NOT LIKE '$%'\"\"\"",
        '              AND t.slug NOT LIKE \'$%\'"""',
    ),
    # Rows the owner no longer (or never) managed count as its mirrors: a detached or another
    # template's row with the item's hash makes the release look already installed.
    Mutant(
        "blind.unchanged-any-owners-rows",
        ENGINE,
        "WHERE t.organization_id = {org} AND t.managed_by_template_agent_id = {owner}",
        "WHERE t.organization_id = {org}",
    ),
    # An unpaired side (item without its row, row without its item, or a NULL mirrored hash)
    # counts as matching: a deleted row or a row the release drops reads as unchanged.
    Mutant(
        "blind.unchanged-unpaired-counts-as-match",
        ENGINE,
        "coalesce(t.mirrored_hash = i.content_hash, false)",
        "coalesce(t.mirrored_hash = i.content_hash, true)",
    ),
    Mutant(
        "blind.noop-ignores-version",
        INSTALLS,
        "            autocommit, actor, organization, template, version, quick=True\n",
        "            autocommit, actor, organization, template, None, quick=True\n",
    ),
    Mutant(
        "blind.context-ignores-quick",
        INSTALLS,
        "CASE WHEN CAST(:quick AS boolean) AND install.status = 'active'",
        "CASE WHEN install.status = 'active'",
    ),
    Mutant(
        "blind.context-statement-cached-once",
        INSTALLS,
        "@functools.cache\ndef _context_statement(org_sql: str) -> TextClause:\n    return statement(",
        "def _context_statement(org_sql: str, _first: list[TextClause] = []) -> TextClause:\n"
        "    if not _first:\n"
        "        _first.append(_context_statement_of(org_sql))\n"
        "    return _first[0]\n"
        "\n"
        "\n"
        "def _context_statement_of(org_sql: str) -> TextClause:\n"
        "    return statement(",
    ),
    Mutant(
        "blind.release-not-checked",
        INSTALLS,
        "release = checked_release({c: found[c] for c in RELEASE_COLUMNS}, template, version)",
        "release = {c: found[c] for c in RELEASE_COLUMNS}",
    ),
    Mutant(
        "blind.requiring-in-any-org",
        INSTALLS,
        "    WHERE d.organization_id = {org} AND d.status = 'active'\n",
        "    WHERE d.status = 'active'\n",
    ),
    Mutant(
        "blind.required-by-version-of-the-required",
        INSTALLS,
        "                                   WHERE dr.id = d.installed_release_id),",
        "                                   WHERE dr.id = a.installed_release_id),",
    ),
    Mutant(
        "blind.uuid-like-slug-not-found",
        ORGS,
        'where = "(o.slug = :ref OR o.id = CAST(:ref_id AS uuid))"',
        'where = "o.id = CAST(:ref_id AS uuid)"',
    ),
    Mutant(
        "blind.unit-of-work-notes-no-token-use",
        DEPS,
        "    async with transaction(engine) as session:\n        if actor is not None:\n",
        "    async with transaction(engine) as session:\n        if False:\n",
    ),
    # The command line passes every option to the service.
    Mutant(
        "cli.resync-requirements-dropped",
        CLI_RESYNC,
        "        with_requirements=with_requirements,\n",
        "",
    ),
    # A generated column's expression lives in the models and in its migration: Alembic does
    # not compare the two, a test does.
    Mutant(
        "models.unlike-mirrored-unlike-its-migration",
        MODELS,
        '"OR content_hash IS DISTINCT FROM mirrored_hash) "',
        '"OR content_hash <> mirrored_hash) "',
    ),
]
