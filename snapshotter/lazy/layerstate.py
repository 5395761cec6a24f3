"""What the layer manager persists per lazy layer, and where: ``<root>/layers/<name>.json``.

A layer state is the daemon's memory of a layer across restarts — its spec, who holds it (owners), when it
was last used, and how the kernel had it (loop device, mounted, swapped).  Not to be confused with the
metastore's snapshot :class:`~snapshotter.metastore.Record`.  The manager keeps the states in memory under
its lock and decides when to write them; this module only reads and writes the files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.lazy.cache import atomic_write
from snapshotter.lazy.spec import BlobSpec

log = logging.getLogger("bootseer.lazy")


@dataclass
class LayerState:
    """``name``: the layer's directory and file name — :attr:`BlobSpec.name` (keyed by the verified identity)
    for layers set up since keys exist; a state written before (no ``name`` in its file) keeps the name its
    file has (``sha256-<hex>``), so its mount, loop device and cache carry on across the upgrade where they
    are.  Either way the manager keys it by :attr:`BlobSpec.key`, computed from the persisted spec."""

    spec: BlobSpec
    owners: set[str] = field(default_factory=set)
    last_used: float = 0.0
    loop: int | None = None
    mounted: bool = False
    swapped: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.spec.name

    @property
    def key(self) -> str:
        return self.spec.key

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "owners": sorted(self.owners), "last_used": self.last_used,
                "loop": self.loop, "mounted": self.mounted, "swapped": self.swapped, "name": self.name}

    @classmethod
    def from_json(cls, doc: dict[str, Any], legacy_name: str = "") -> LayerState:
        spec = BlobSpec.from_json(doc["spec"])
        name = str(doc.get("name") or legacy_name or spec.name)
        if name not in (spec.name, spec.digest.replace(":", "-")):  # a state file must not point elsewhere
            raise ValueError(f"layer name {name!r} does not belong to blob {spec.digest}")
        return cls(spec, set(doc.get("owners", ())), float(doc.get("last_used", 0)), doc.get("loop"),
                   bool(doc.get("mounted")), bool(doc.get("swapped")), name)


class LayerStateFiles:
    """The state files in ``directory``, one per blob (named by :attr:`BlobSpec.name`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self) -> Iterator[LayerState]:
        """Every readable state, in file-name order; unreadable ones are logged and skipped."""
        for path in sorted(self.directory.glob("*.json")):
            try:
                yield LayerState.from_json(json.loads(path.read_text()), legacy_name=path.name[: -len(".json")])
            except (OSError, ValueError, KeyError) as e:
                log.error("ignoring unreadable layer state %s: %s", path, e)

    def names(self) -> set[str]:
        """The names that have a state file, readable or not (a layer whose state cannot be read now is still
        not anyone else's to delete)."""
        return {path.name[: -len(".json")] for path in self.directory.glob("*.json")}

    def encode(self, state: LayerState) -> bytes:
        return json.dumps(state.to_json(), indent=1).encode()

    def write(self, name: str, data: bytes) -> None:
        """Durably replace the state file of ``name`` with ``data`` (from :meth:`encode`)."""
        atomic_write(self.path(name), data)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
