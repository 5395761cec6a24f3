"""The lazy handler's plain core, driven without a kernel: a remote Prepare sets the following layers of the
image up ahead of their own Prepares (the CRI labels name them), each held provisionally until its Prepare
takes it over or the hold runs out, and each layer's hot-block prefetch starts exactly once per mount."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from bootseer.testkit import wait_until
from snapshotter.lazy.ahead import AheadState, ahead_owner
from snapshotter.lazy.handler import LazyHandler
from snapshotter.lazy.spec import BlobSpec
from snapshotter.remote import (
    LABEL_CRI_IMAGE_LAYERS,
    LABEL_CRI_IMAGE_REF,
    LABEL_CRI_LAYER_DIGEST,
    LABEL_CRI_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
    RemoteRequest,
)

IMAGE, MANIFEST = "reg.example/app:1", "sha256:" + "m" * 64
LAYERS = ["sha256:" + c * 64 for c in "abcd"]
NOT_LAZY = LAYERS[2]  # the index left this layer out: the ordinary pull path


def _spec(layer: str) -> BlobSpec:
    return BlobSpec(registry="http://reg.example", mirrors=(), repository="app", digest="sha256:" + layer[7] * 63 + "0",
                    size=4096, chunk_size=4096, chunks=("0" * 64,))


class FakeManager:
    """What the handler needs of :class:`LayerManager`: holds per blob, a layer object per mount."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owners: dict[str, set[str]] = {}
        self.layers: dict[str, object] = {}
        self.acquires: list[tuple[str, str]] = []
        self.replaced: list[str] = []  # provisional holds taken over by a Prepare's acquire
        self.released = threading.Event()

    def acquire(self, spec: BlobSpec, owner: str, *, replaces: str | None = None) -> Path:
        with self.lock:
            self.acquires.append((spec.digest, owner))
            self.owners.setdefault(spec.digest, set()).add(owner)
            if replaces is not None and replaces != owner:
                self.owners[spec.digest].discard(replaces)
                self.replaced.append(replaces)
            self.layers.setdefault(spec.digest, object())
        return Path("/mnt") / spec.name

    def release(self, owner: str, digest: str | None = None, *, force: bool = False) -> list[str]:
        with self.lock:
            held = self.owners.get(digest or "", set())
            held.discard(owner)
            gone = [] if held else [digest or ""]
            if not held:
                self.layers.pop(digest or "", None)
        self.released.set()
        return gone

    def layer(self, digest: str) -> object | None:
        with self.lock:
            return self.layers.get(digest)


class Hooked:
    """A :class:`PrefetchHook` that notes the layers whose prefetch started."""

    def __init__(self) -> None:
        self.layers: list[str] = []

    def lookup(self, image: str, manifest: str) -> None:
        return None

    def on_mount(self, image: str, manifest: str, layer: str, spec: BlobSpec) -> None:
        self.layers.append(layer)


def _handler(hold: float = 60.0) -> tuple[LazyHandler, FakeManager, list[str]]:
    manager = FakeManager()
    hooked = Hooked()

    def specs(image: str, manifest: str, layer: str) -> BlobSpec | None:
        return None if layer == NOT_LAZY else _spec(layer)

    return LazyHandler(manager, specs, prefetch=hooked, ahead_hold=hold), manager, hooked.layers  # type: ignore[arg-type]


def _prepare(h: LazyHandler, i: int) -> None:
    labels = {LABEL_SNAPSHOT_REF: f"chain-{i}", LABEL_CRI_IMAGE_REF: IMAGE, LABEL_CRI_MANIFEST_DIGEST: MANIFEST,
              LABEL_CRI_LAYER_DIGEST: LAYERS[i], LABEL_CRI_IMAGE_LAYERS: ",".join(LAYERS[i:])}
    h.prepare(RemoteRequest("ns", f"extract-{i}", f"chain-{i - 1}" if i else "", f"chain-{i}", labels))


def _ahead_done(h: LazyHandler) -> bool:
    return h.ahead.idle()


def test_first_prepare_sets_up_the_following_lazy_layers_ahead() -> None:
    h, m, hooked = _handler()
    try:
        _prepare(h, 0)
        wait_until(lambda: _ahead_done(h), 10, "set-ups ahead")
        held = {d: set(o) for d, o in m.owners.items()}
        assert held[_spec(LAYERS[0]).digest] == {"ns/chain-0"}
        for layer in (LAYERS[1], LAYERS[3]):  # the layers after it, lazy ones only, provisionally held
            assert held[_spec(layer).digest] == {ahead_owner(MANIFEST, layer)}
        assert len(held) == 3 and sorted(hooked) == sorted([LAYERS[0], LAYERS[1], LAYERS[3]])

        for i in (1, 2, 3):  # containerd's own Prepares, bottom up
            _prepare(h, i)
        wait_until(lambda: _ahead_done(h), 10, "set-ups ahead")
        # each real Prepare took its layer over: the provisional holds are gone, nothing is set up twice
        assert {d: set(o) for d, o in m.owners.items()} == {
            _spec(LAYERS[i]).digest: {f"ns/chain-{i}"} for i in (0, 1, 3)}
        assert sorted(hooked) == sorted([LAYERS[0], LAYERS[1], LAYERS[3]])  # one prefetch per mount
        assert sorted(m.replaced) == sorted(ahead_owner(MANIFEST, d) for d in (LAYERS[1], LAYERS[3]))
        assert h.ahead.pending() == 0
    finally:
        h.close()


def test_a_layer_never_prepared_is_released_when_its_hold_runs_out() -> None:
    h, m, _ = _handler(hold=0.2)
    try:
        _prepare(h, 2)  # a (not lazy) layer's Prepare sets up the lazy one above it, which is never prepared
        wait_until(lambda: _ahead_done(h), 10, "set-ups ahead")
        top = _spec(LAYERS[3]).digest
        assert m.owners[top] == {ahead_owner(MANIFEST, LAYERS[3])}
        wait_until(lambda: not m.owners.get(top), 10, "the provisional hold to run out")
        assert m.layer(top) is None and h.ahead.pending() == 0  # unmounted: nobody else held it
    finally:
        h.close()


def test_a_prepare_that_finds_its_layer_released_sets_it_up_again_and_prefetches() -> None:
    h, m, hooked = _handler(hold=0.2)
    try:
        _prepare(h, 0)
        wait_until(lambda: _ahead_done(h), 10, "set-ups ahead")
        d1 = _spec(LAYERS[1]).digest
        wait_until(lambda: not m.owners.get(d1), 10, "the provisional hold to run out")
        _prepare(h, 1)  # late: a new mount, so its prefetch starts again
        assert m.owners[d1] == {"ns/chain-1"} and hooked.count(LAYERS[1]) == 2
    finally:
        h.close()


def test_a_prepare_starts_the_hot_block_manifest_lookup_before_setting_its_layer_up() -> None:
    """The hot-block manifest's requests overlap the layer's index lookup and mount (``lookup`` first), so the
    prefetch can start as soon as the layer is mounted."""
    manager = FakeManager()
    calls: list[str] = []

    class Prefetcher:
        def lookup(self, image: str, manifest: str) -> None:
            calls.append(f"lookup {image} {manifest}")

        def on_mount(self, image: str, manifest: str, layer: str, spec: BlobSpec) -> None:
            calls.append(f"prefetch {layer}")

    def specs(image: str, manifest: str, layer: str) -> BlobSpec | None:
        calls.append(f"spec {layer}")
        return _spec(layer)

    h = LazyHandler(manager, specs, prefetch=Prefetcher(), ahead=0)  # type: ignore[arg-type]
    _prepare(h, 0)
    assert calls == [f"lookup {IMAGE} {MANIFEST}", f"spec {LAYERS[0]}", f"prefetch {LAYERS[0]}"]
    h.close()


def test_a_prepare_arriving_during_its_layers_set_up_ahead_takes_it_over_without_an_unmount() -> None:
    """The Prepare of a layer whose set-up ahead is still mounting waits for it and takes its hold over: the
    layer is never left without a holder (that unmounted it, and the Prepare mounted it again: 0.5 s of a
    pull), and its prefetch starts once."""
    class GatedManager(FakeManager):
        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()
            self.mounting = threading.Event()
            self.unheld: list[str] = []

        def acquire(self, spec: BlobSpec, owner: str, *, replaces: str | None = None) -> Path:
            if owner.startswith("ahead/") and spec.digest == _spec(LAYERS[1]).digest:
                self.mounting.set()
                assert self.gate.wait(10)
            return super().acquire(spec, owner, replaces=replaces)

        def release(self, owner: str, digest: str | None = None, *, force: bool = False) -> list[str]:
            gone = super().release(owner, digest, force=force)
            self.unheld += [d for d in gone if d]
            return gone

    m = GatedManager()
    hook = Hooked()
    hooked = hook.layers
    h = LazyHandler(m, lambda image, manifest, layer: _spec(layer), prefetch=hook)  # type: ignore[arg-type]
    try:
        _prepare(h, 0)
        assert m.mounting.wait(10)  # layer 1 is being set up ahead ...
        second = threading.Thread(target=_prepare, args=(h, 1))
        second.start()  # ... when its own Prepare comes
        wait_until(lambda: h.ahead.state(MANIFEST, LAYERS[1]) is AheadState.CLAIMED, 10,
                   "the Prepare to claim the set-up")
        m.gate.set()
        second.join(10)
        assert not second.is_alive()
        d1 = _spec(LAYERS[1]).digest
        assert m.unheld == [] and m.owners[d1] == {"ns/chain-1"}
        assert ahead_owner(MANIFEST, LAYERS[1]) in m.replaced and hooked.count(LAYERS[1]) == 1
    finally:
        m.gate.set()
        h.close()


def test_a_prepare_the_core_could_not_record_is_discarded_from_any_thread() -> None:
    """The core hands back an unrecorded answer explicitly (request and layer), so the hold is dropped whatever
    thread does it — unless a concurrent Prepare of the same chain ID recorded it first, whose hold it is."""
    m = FakeManager()
    h = LazyHandler(m, lambda image, manifest, layer: _spec(layer), ahead=0)  # type: ignore[arg-type]
    recorded: set[tuple[str, str]] = set()
    h.bind(lambda ns, name: (ns, name) in recorded)
    labels = {LABEL_SNAPSHOT_REF: "chain-0", LABEL_CRI_IMAGE_REF: IMAGE, LABEL_CRI_MANIFEST_DIGEST: MANIFEST,
              LABEL_CRI_LAYER_DIGEST: LAYERS[0]}
    req = RemoteRequest("ns", "extract-0", "", "chain-0", labels)
    answers: list[Any] = []
    t = threading.Thread(target=lambda: answers.append(h.prepare(req)))
    t.start()
    t.join(10)
    [layer] = answers
    d0 = _spec(LAYERS[0]).digest
    recorded.add(("ns", "chain-0"))  # the concurrent winner's snapshot: the shared hold stays
    h.discard(req, layer)
    assert m.owners[d0] == {"ns/chain-0"}
    recorded.clear()  # nobody recorded it: the hold goes
    h.discard(req, layer)
    assert m.owners[d0] == set()
    h.close()
