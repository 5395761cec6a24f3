"""The local stack's state file (``stack.json``): where its sockets, addresses and logs are.

`bootseer stack up` (:mod:`integration.stack`) writes it; the node-side commands read it for their defaults
when a local stack is up (:func:`local_stack_value`) — ``bootseer pull`` asks it for containerd's socket and
the ``certs.d`` directory on every run.  It lives in the core, apart from :mod:`integration.stack` (which
imports requests, the image builders and the network namespace code to start a stack), so that reading it
costs a command almost nothing and the core never imports the integration package (which a daemon-only
install lacks): no stack, or an unreadable state file, only means "no such default".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "stack.json"
DEFAULT_ROOT = Path(os.environ.get("BOOTSEER_STACK_DIR", "/var/tmp/bootseer-stack"))


@dataclass
class StackInfo:
    root: str
    containerd_socket: str
    containerd_config: str
    registry: str  # host:port, plain HTTP
    registry_url: str
    registry_storage: str
    sandbox_image: str
    snapshotter_socket: str | None = None
    snapshotter_root: str | None = None
    snapshotter_control: str | None = None  # lazy layers' control socket (bootseer status, recorder)
    snapshotter_metrics: str | None = None  # host:port of its Prometheus /metrics
    sidecar_url: str | None = None
    signing_key: str | None = None  # the stack's index-signing private key (its snapshotter trusts the public one)
    netns: str | None = None
    netns_id: str | None = None
    rate_bps: int | None = None
    logs: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)


def read_info(root: Path = DEFAULT_ROOT) -> StackInfo:
    """The state of the stack at ``root``; FileNotFoundError if none is up there, ValueError/TypeError if the
    file is not a stack's state."""
    return StackInfo(**json.loads((Path(root) / STATE_FILE).read_text()))


def local_stack() -> StackInfo | None:
    """The stack `bootseer stack up` runs at the default root, or None (no stack, or an unreadable state)."""
    try:
        return read_info()
    except (OSError, ValueError, TypeError):
        return None


def local_stack_value(field: str) -> str | None:
    """``field`` of the running local stack's state (see :class:`StackInfo`), or None."""
    info = local_stack()
    value = getattr(info, field, None) if info is not None else None
    return str(value) if value else None
