"""Mutation pass over the install engine and the services: does the suite notice planted bugs?

Each mutant (`tools/mutants.py`) is one small, meaningful bug in one of the core modules: a
flipped condition, a dropped WHERE clause, a lock taken away, a version off by one, a status
swapped.
For each, the runner writes the mutant into a scratch copy of the project (the working tree is
never touched), runs the test modules that cover the mutated module against one shared
PostgreSQL, and reports the mutant `killed` (a test failed) or `survived`. Tool-generated
mutants are of little use here: most of the logic is SQL in strings, which those tools either
leave alone or break into syntax errors.

    uv run python -m tools.mutation               # the whole pass, then the score
    uv run python -m tools.mutation plan. rules   # only mutants whose name contains a word
    uv run python -m tools.mutation --list        # every mutant, and whether it still applies
    uv run python -m tools.mutation NAME -t tests/test_install.py::TestDrift  # chosen tests

A mutant whose original text is no longer found exactly once is `stale`: the code moved on,
so rewrite the mutant for the new code. A mutant marked `equivalent` changes nothing a correct
program could notice (its reason says why); it is run all the same and left out of the score,
and the pass fails should one ever be killed. Tests that run past ten minutes kill their
mutant (a hang is noticed too). The exit status is 0 only when every other mutant was killed
and none is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL

from install_service.db.engine import async_url, start_embedded
from tools.mutants import MUTANTS, TESTS, Mutant

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("install_service", "tests", "alembic.ini", "pyproject.toml")
TIMEOUT_SECONDS = 600


def stale_reason(mutant: Mutant, sources: dict[str, str]) -> str:
    """Why the mutant cannot be applied to today's code, or "" when it can."""
    found = sources[mutant.path].count(mutant.old)
    if found == 1:
        return ""
    return "original text not found" if found == 0 else f"original text found {found} times"


def scratch_copy(into: Path) -> Path:
    """The project's code and tests, copied where mutants may be written."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, into / name)
    return into


def run_tests(copy: Path, server: URL, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """Run `tests` in the copy, stopping at the first failure: (`passed`, `failed` or
    `timeout`, seconds, the failure's summary line). The copy comes first on the path, so
    its modules are the ones imported."""
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "PYTHONDONTWRITEBYTECODE": "1",  # a same-size mutant must never hit a stale .pyc
        "COLUMNS": "400",  # failure summaries keep their reason
        "INSTALL_SERVICE_DATABASE_URL": server.render_as_string(hide_password=False),
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(  # noqa: S603 (our own test run)
            command,
            cwd=copy,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    elapsed = time.monotonic() - started
    output = done.stdout.decode(errors="replace")
    # With tests spread over processes (pytest-xdist), stopping at the first failure ends
    # the session as interrupted (exit 2), not as failed.
    stopped = done.returncode == 2 and "stopping after" in output
    if done.returncode in (0, 1) or stopped:
        # A failed test first; an error is the teardown's invariant check, after a test.
        failures = [x for x in output.splitlines() if x.startswith(("FAILED", "ERROR"))]
        failures.sort(key=lambda line: not line.startswith("FAILED"))
        return ("passed" if done.returncode == 0 else "failed"), elapsed, "".join(failures[:1])
    tail = output[-3000:]
    raise SystemExit(f"pytest could not run {tests} (exit {done.returncode}):\n{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mutation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("-t", "--tests", action="append", help="run these tests instead")
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_SECONDS,
        help="seconds a test run may take (default %(default)s; more on a busy machine)",
    )
    args = parser.parse_args()
    # SIGTERM stops the pass like Ctrl-C: the running tests are killed and the exit hooks run,
    # which stop the embedded PostgreSQL it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    sources = {path: (ROOT / path).read_text() for path in TESTS}
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in chosen:
            state = stale_reason(m, sources) or ("equivalent" if m.equivalent else "applies")
            print(f"{m.name:50} {m.path:40} {state}")
        return 0

    configured = os.environ.get("INSTALL_SERVICE_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="install-service-mutation-") as tmp:
        server = async_url(configured) if configured else start_embedded(Path(tmp) / "db")
        copy = scratch_copy(Path(tmp) / "project")
        # A mutant counts only against tests that pass without it.
        every_test = list(dict.fromkeys(t for m in chosen for t in args.tests or TESTS[m.path]))
        outcome, seconds, failure = run_tests(copy, server, every_test, args.timeout)
        print(f"baseline  {outcome:8} {seconds:6.1f}s  {' '.join(every_test)}", flush=True)
        if outcome != "passed":
            print(failure or "the tests do not pass without mutants", file=sys.stderr)
            return 2
        results: dict[str, list[Mutant]] = {}
        for m in chosen:
            reason = stale_reason(m, sources)
            if reason:
                results.setdefault("stale", []).append(m)
                print(f"stale     {m.name}: {reason} in {m.path}", flush=True)
                continue
            target = copy / m.path
            target.write_text(sources[m.path].replace(m.old, m.new))
            try:
                outcome, seconds, failure = run_tests(
                    copy, server, args.tests or TESTS[m.path], args.timeout
                )
            finally:
                target.write_text(sources[m.path])
            verdict = "survived" if outcome == "passed" else "killed"
            if m.equivalent:
                verdict = "equivalent" if verdict == "survived" else "not-equivalent"
            results.setdefault(verdict, []).append(m)
            note = "timed out" if outcome == "timeout" else failure
            print(f"{verdict:9} {m.name}  {seconds:.1f}s  {note}".rstrip(), flush=True)

    counted = len(results.get("killed", [])) + len(results.get("survived", []))
    killed = len(results.get("killed", []))
    print(
        f"\nscore: {killed}/{counted} killed"
        + (f" ({100 * killed / counted:.0f}%)" if counted else "")
        + f"; {len(results.get('stale', []))} stale"
        + f"; {len(results.get('equivalent', []))} equivalent, not counted"
    )
    for verdict in ("survived", "stale", "not-equivalent"):
        for m in results.get(verdict, []):
            print(f"  {verdict}: {m.name} ({m.path})")
    for m in results.get("equivalent", []):
        print(f"  equivalent: {m.name}: {m.equivalent}")
    failed = any(results.get(v) for v in ("survived", "stale", "not-equivalent"))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the pass stopped, its database with it", file=sys.stderr)
        sys.exit(130)
