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
    spec: BlobSpec
    owners: set[str] = field(default_factory=set)
    last_used: float = 0.0
    loop: int | None = None
    mounted: bool = False
    swapped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "owners": sorted(self.owners), "last_used": self.last_used,
                "loop": self.loop, "mounted": self.mounted, "swapped": self.swapped}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LayerState:
        return cls(BlobSpec.from_json(doc["spec"]), set(doc.get("owners", ())), float(doc.get("last_used", 0)),
                   doc.get("loop"), bool(doc.get("mounted")), bool(doc.get("swapped")))


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
                yield LayerState.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError) as e:
                log.error("ignoring unreadable layer state %s: %s", path, e)

    def encode(self, state: LayerState) -> bytes:
        return json.dumps(state.to_json(), indent=1).encode()

    def write(self, name: str, data: bytes) -> None:
        """Durably replace the state file of ``name`` with ``data`` (from :meth:`encode`)."""
        atomic_write(self.path(name), data)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
