"""Named crash points, so tests can kill the daemon at an exact step of Prepare/Commit/Remove/Cleanup.

A crash-consistency claim is only worth what its test exercises.  Killing the daemon with a signal at a
random moment rarely lands between, say, "directory renamed" and "transaction committed"; these hooks make
every such window reachable on purpose.  Set ``BOOTSEER_CRASH_AT`` to one (or a comma-separated list) of
the names in :data:`POINTS` before the daemon starts; when execution reaches that point the process ends
at once with ``os._exit`` — no ``finally`` blocks, no sqlite rollback, no atexit — the same as ``kill -9``.
Unset (the normal case), :func:`crashpoint` is one set lookup.
"""

from __future__ import annotations

import os
import sys

ENV = "BOOTSEER_CRASH_AT"
EXIT_CODE = 137  # what a shell reports for SIGKILL, so logs read the same

POINTS = (
    "prepare.tempdir",  # temporary directory made inside the open transaction, no record yet
    "prepare.recorded",  # record inserted, transaction open, directory not renamed
    "prepare.renamed",  # directory renamed to its id, transaction still open
    "prepare.committed",  # transaction committed, reply not sent
    "commit.usage",  # usage computed, metadata not yet changed
    "commit.recorded",  # record moved to its new name, transaction open
    "commit.committed",  # transaction committed, reply not sent
    "remove.recorded",  # record deleted, transaction open
    "remove.committed",  # record deletion committed, directory still under its id
    "remove.renamed",  # directory moved aside (rm-*), not yet deleted
    "remove.partial",  # directory half deleted
    "cleanup.listed",  # orphans listed, nothing moved yet
)

_armed: frozenset[str] = frozenset()


def arm_from_env() -> None:
    """Read :data:`ENV` (the daemon calls this once at start); unknown names are an error, not a no-op."""
    global _armed
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    unknown = names - set(POINTS)
    if unknown:
        raise ValueError(f"{ENV}: unknown crash point(s) {sorted(unknown)}; known: {', '.join(POINTS)}")
    _armed = frozenset(names)


def crashpoint(name: str) -> None:
    """End the process now if ``name`` is armed."""
    if name in _armed:
        sys.stderr.write(f"bootseer snapshotter: crash point {name!r} reached, exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def armed(name: str) -> bool:
    """Whether ``name`` is armed (for points that must prepare the damage before dying)."""
    return name in _armed
