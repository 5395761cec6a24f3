"""Setting the following layers of an image up ahead of their own Prepares (see :mod:`snapshotter.lazy.handler`).

Each layer set up ahead is one entry with one state, changed only under :class:`SetUpAhead`'s one lock (a
condition variable: a Prepare waits on it for a mount under way).  The transitions, and who makes them::

    (none)           --queue()-------------------------------> QUEUED
    QUEUED           --claim(): its Prepare came first-------> (gone)   the Prepare sets the layer up itself
    QUEUED           --a set-up thread takes it--------------> MOUNTING
    MOUNTING         --claim()-------------------------------> CLAIMED  the Prepare waits for the mount
    MOUNTING         --mounted---------------------------------> HELD   provisional hold; the set-up starts
                                                                        the layer's prefetch, then its timer
    CLAIMED          --mounted-------------------------------> HANDED   the waiting Prepare takes the hold
                                                                        over and starts the prefetch itself
    MOUNTING/CLAIMED --not lazy, or the set-up failed--------> FAILED   (gone; a waiting Prepare gets None)
    HELD             --claim()-------------------------------> (gone)   the Prepare takes the hold over; the
                                                                        prefetch the set-up started stays
    HELD             --no Prepare within the hold time-------> (gone)   the provisional hold is released

A claim returns only once the entry has left MOUNTING/CLAIMED: a Prepare that went on while its layer was
still being mounted would acquire it on the layer's lock anyway — and a set-up that dropped its hold before
the Prepare held the layer would unmount it and make the Prepare mount it again.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bootseer import events
from snapshotter.lazy.spec import BlobSpec

log = logging.getLogger("bootseer.lazy.handler")


class AheadState(enum.Enum):
    QUEUED = "queued"
    MOUNTING = "mounting"
    CLAIMED = "claimed"  # mounting, and its Prepare is waiting
    HELD = "held"  # mounted under the provisional hold, prefetch started by the set-up
    HANDED = "handed"  # mounted while its Prepare waited: the Prepare takes the hold and starts the prefetch
    FAILED = "failed"  # not lazy, or the set-up failed


class _Layers(Protocol):
    """What the set-up needs of the layer manager."""

    def acquire(self, spec: BlobSpec, owner: str, *, replaces: str | None = None) -> Path: ...

    def release(self, owner: str, digest: str | None = None, *, force: bool = False) -> list[str]: ...

    def layer(self, digest: str) -> object | None: ...


SpecLookup = Callable[[str, str, str], "BlobSpec | None"]  # (image, manifest, layer) → its blob, or None
StartPrefetch = Callable[[str, str, str, BlobSpec], None]  # (image, manifest, layer, spec)


def ahead_owner(manifest_digest: str, layer_digest: str) -> str:
    """The provisional owner of a layer set up ahead of its Prepare."""
    return f"ahead/{manifest_digest}/{layer_digest}"


@dataclass
class _Entry:
    state: AheadState = AheadState.QUEUED
    blob: str | None = None  # once mounted: its blob (the provisional hold is on it)
    layer: object | None = None  # once mounted: the manager's layer object the set-up mounted
    timer: threading.Timer | None = None  # in HELD: ends the provisional hold


@dataclass(frozen=True)
class Claimed:
    """What a Prepare finds of its layer set up ahead: the blob under the provisional hold, the manager's
    layer object that set-up mounted, and whether the set-up started that mount's prefetch."""

    blob: str
    layer: object | None
    prefetch_started: bool


class SetUpAhead:
    """The set-ups ahead of one handler: ``workers`` threads per :meth:`queue` call, holds that end after
    ``hold`` seconds unless a Prepare claims them."""

    def __init__(self, layers: _Layers, specs: SpecLookup, start_prefetch: StartPrefetch, *, workers: int,
                 hold: float) -> None:
        self.layers = layers
        self.specs = specs
        self.start_prefetch = start_prefetch
        self.workers = max(0, workers)
        self.hold = hold
        self._cond = threading.Condition()  # the one lock: every entry and every state change
        self._entries: dict[tuple[str, str], _Entry] = {}  # (manifest, layer) → its set-up
        self._threads: list[threading.Thread] = []

    # -- queries (status, tests) ---------------------------------------------------------------------
    def state(self, manifest: str, layer: str) -> AheadState | None:
        with self._cond:
            entry = self._entries.get((manifest, layer))
            return entry.state if entry is not None else None

    def pending(self) -> int:
        """Entries not claimed or expired yet."""
        with self._cond:
            return len(self._entries)

    def idle(self) -> bool:
        """No set-up thread is running."""
        with self._cond:
            return not any(t.is_alive() for t in self._threads)

    # -- transitions ---------------------------------------------------------------------------------
    def queue(self, image: str, manifest: str, layers: list[str]) -> None:
        """Set ``layers`` (of ``image`` = ``manifest``) up ahead, those not queued already."""
        if not self.workers:
            return
        todo: list[str] = []
        with self._cond:
            for d in layers:
                if d and (manifest, d) not in self._entries:
                    self._entries[(manifest, d)] = _Entry()
                    todo.append(d)
            self._threads = [t for t in self._threads if t.is_alive()]

        def work() -> None:
            while True:
                with self._cond:
                    if not todo:
                        return
                    d = todo.pop(0)
                self._set_up(image, manifest, d)

        for k in range(min(len(todo), self.workers)):
            t = threading.Thread(target=work, daemon=True, name=f"ahead-{manifest[7:15]}-{k}")
            with self._cond:
                self._threads.append(t)
            t.start()

    def claim(self, manifest: str, layer: str) -> Claimed | None:
        """The layer's own Prepare has come: take its entry (waiting for a mount under way).  None if nothing
        was set up ahead (or it was only queued, or failed, or is not lazy)."""
        key = (manifest, layer)
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.state is AheadState.QUEUED:
                del self._entries[key]
                return None
            if entry.state is AheadState.MOUNTING:
                entry.state = AheadState.CLAIMED
            self._cond.wait_for(lambda: entry.state not in (AheadState.MOUNTING, AheadState.CLAIMED))
            if self._entries.get(key) is entry:
                del self._entries[key]
            timer, entry.timer = entry.timer, None
            state, blob = entry.state, entry.blob
        if timer is not None:
            timer.cancel()
        if state in (AheadState.HELD, AheadState.HANDED) and blob is not None:
            return Claimed(blob, entry.layer, prefetch_started=state is AheadState.HELD)
        return None

    def _set_up(self, image: str, manifest: str, layer: str) -> None:
        key, owner = (manifest, layer), ahead_owner(manifest, layer)
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.state is not AheadState.QUEUED:  # its Prepare came first
                return
            entry.state = AheadState.MOUNTING
        spec: BlobSpec | None = None
        try:
            spec = self.specs(image, manifest, layer)
            if spec is not None:
                with events.span("image_mount", component="bootseer snapshotter", image=image, layer=layer,
                                 blob=spec.digest, ahead=True):
                    self.layers.acquire(spec, owner)
        except Exception as e:  # its own Prepare tries again, and reports
            log.info("setting up layer %s of %s ahead failed: %s", layer[:19], image, e)
            spec = None
        with self._cond:
            if spec is None:  # not lazy (its Prepare takes the ordinary path), or failed
                if entry.state is AheadState.MOUNTING and self._entries.get(key) is entry:
                    del self._entries[key]  # (a claiming Prepare removes the entry itself)
                entry.state = AheadState.FAILED
                self._cond.notify_all()
                return
            entry.blob, entry.layer = spec.digest, self.layers.layer(spec.digest)
            held = entry.state is AheadState.MOUNTING
            entry.state = AheadState.HELD if held else AheadState.HANDED
            if not held:
                self._cond.notify_all()  # the waiting Prepare takes the hold over and starts the prefetch
                return
        try:
            self.start_prefetch(image, manifest, layer, spec)
            log.info("layer %s of %s set up ahead of its Prepare: blob %s", layer[:19], image, spec.digest[:19])
        finally:
            with self._cond:
                self._cond.notify_all()
                if self._entries.get(key) is entry:  # not claimed meanwhile: the hold ends in ``hold`` s at the latest
                    entry.timer = threading.Timer(self.hold, self._expire, args=(key, entry))
                    entry.timer.daemon = True
                    entry.timer.start()

    def _expire(self, key: tuple[str, str], entry: _Entry) -> None:
        """No Prepare took the layer over: drop the provisional hold (unmounting it if nobody else holds it)."""
        with self._cond:
            if self._entries.get(key) is not entry:
                return
            del self._entries[key]
        log.info("layer %s was set up ahead but never prepared; released", key[1][:19])
        self.layers.release(ahead_owner(*key), entry.blob)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for set-ups still running and stop the hold timers (the holds go with the daemon)."""
        with self._cond:
            threads, entries = list(self._threads), list(self._entries.values())
        for t in threads:
            t.join(timeout)
        for e in entries:
            if e.timer is not None:
                e.timer.cancel()
