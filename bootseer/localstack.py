"""Defaults from the local stack (`bootseer stack up`) for the node-side commands, when one is up.

The stack is a development and CI tool (the ``integration`` package, which a daemon-only install lacks), so
its absence — no package, no stack, an unreadable state file — only means "no such default"."""

from __future__ import annotations


def local_stack_value(field: str) -> str | None:
    """``field`` of the running local stack's state (see :class:`integration.state.StackInfo`), or None."""
    try:
        from integration.state import local_stack
    except ImportError:
        return None
    info = local_stack()
    value = getattr(info, field, None) if info is not None else None
    return str(value) if value else None
