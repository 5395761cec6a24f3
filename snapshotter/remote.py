"""The hook through which a remote (lazily pulled) layer enters the snapshotter.

containerd's remote-snapshot protocol: on ``Prepare`` carrying ``containerd.io/snapshot.ref=<chain id>``
a snapshotter that can provide that layer without a download commits a snapshot named ``<chain id>`` (with
the same parent, and the Prepare's labels so containerd's follow-up ``List`` filter
``labels."containerd.io/snapshot.ref"==<chain id>,parent==<parent>`` finds it) and answers
``ALREADY_EXISTS``; containerd then skips fetching and applying that layer.

The core (:class:`snapshotter.overlay.Snapshotter`) owns the protocol and the crash-safe bookkeeping; a
:class:`RemoteHandler` only decides and mounts.  A remote snapshot is an ordinary committed record whose
``lower`` column names the directory (the handler's mount, outside the snapshotter's tree) that stands for
the layer in every lowerdir chain above it — so mount shapes, children, views, Remove and the conformance
behaviour need no special cases.

Every failure of a handler falls back to the ordinary path (containerd downloads and applies the tar), so
a broken lazy path costs speed, never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from snapshotter.metastore import Record

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"  # the chain ID containerd wants to end up with
LABEL_REMOTE = "containerd.io/snapshot/remote"  # set on remote snapshots; value = the handler's name
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"


@dataclass(frozen=True)
class RemoteRequest:
    """What a handler gets on a Prepare that names a target chain ID."""

    namespace: str
    key: str  # the active key containerd asked for (never created when the handler accepts)
    parent: str  # the parent snapshot name ("" for the bottom layer)
    target: str  # containerd.io/snapshot.ref: the name the committed snapshot must get
    labels: dict[str, str]
    parent_lowers: tuple[Path, ...] = ()  # the parent chain's layer directories, nearest first


@dataclass(frozen=True)
class RemoteLayer:
    """A handler's answer: the layer is available (mounted) at ``lower``."""

    lower: Path  # directory used as this layer's lowerdir; must stay valid until release()
    name: str = "bootseer"  # value of the containerd.io/snapshot/remote label
    size: int = 0  # Usage of the layer (bytes, inodes) as the handler counts it
    inodes: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # extra labels for the committed snapshot


class RemoteHandler(Protocol):
    """Implemented by the lazy-pull path (:mod:`snapshotter.lazy`); all methods may raise."""

    def prepare(self, req: RemoteRequest) -> RemoteLayer | None:
        """Make the layer available and return where, or None to take the ordinary path.

        Called without the metadata lock held, so it may take time (fetch an index, set up mounts).  If the
        core then fails to record the snapshot (e.g. a concurrent Prepare recorded the same target first)
        it calls :meth:`discard` with the same request and this answer."""
        ...

    def discard(self, req: RemoteRequest, layer: RemoteLayer) -> None:
        """``layer``, the answer of :meth:`prepare` to ``req``, was never recorded: drop what that prepare
        holds (unmount if nothing else holds it)."""
        ...

    def release(self, record: Record) -> None:
        """The remote snapshot ``record`` (its ``lower`` the layer's mount) is being removed: unmount, drop
        references."""
        ...

    def restore(self, records: list[Record]) -> None:
        """At daemon start: the remote snapshots the metadata still holds.  Re-establish their ``lower``
        mounts (or check they survived) and drop anything not listed — it belongs to no snapshot."""
        ...

    def collect(self, records: list[Record]) -> list[str]:
        """containerd's Cleanup (after its garbage collection): the remote snapshots the metadata holds now.
        Release what no snapshot uses (holds a Prepare took a moment ago are spared: its snapshot is being
        recorded) and bring the caches back under their budget; return what was released or evicted."""
        ...
