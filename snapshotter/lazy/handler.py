"""The snapshotter's :class:`~snapshotter.remote.RemoteHandler` for lazy layers: CRI labels → index → mount.

On a remote ``Prepare`` containerd passes (with ``disable_snapshot_annotations = false``, or from
``bootseer pull``) the image reference, the manifest digest and the layer digest.  :class:`LazyHandler` asks
a :class:`SpecSource` whether the image's BootSeer index has an EROFS blob for that layer; if so it has the
:class:`~snapshotter.lazy.manager.LayerManager` mount it and returns the mount as the layer's lowerdir, and
the core commits the snapshot under the chain ID and answers ``ALREADY_EXISTS``.  Any other outcome — labels
missing, no index, a layer the converter skipped, a registry error, a mount that failed — returns None or
raises, and the core falls back to the ordinary pull, so a broken lazy path costs speed, never a start.

Ownership: each remote snapshot holds its layer as owner ``<namespace>/<snapshot name>`` (the committed
record's), so Remove releases exactly that hold and the restart hand-back (:meth:`LazyHandler.restore`)
drops every hold whose snapshot no longer exists.

**Setting up the following layers ahead.**  containerd prepares an image's layers one after another, each
Prepare waiting for the one below; a lazy layer's set-up (index lookup, loop device, erofs mount — whose
superblock read is a fetch racing the prefetch already under way) is a noticeable part of each
(docs/bench/design-measurements.md).  The CRI labels
name the layers that follow (``cri.image-layers``), so the first Prepare of a pull sets those up at once, in
parallel, each held by a provisional owner ``ahead/<manifest>/<layer>`` and with its hot-block prefetch
started: their own Prepares then find them mounted.  A provisional hold ends when the layer's real Prepare
takes it over, or after ``ahead_hold`` seconds (a layer containerd never prepares — its snapshot existed —
is unmounted then); a restart drops it like any hold no snapshot has.  The states of a set-up ahead and
their transitions: :mod:`snapshotter.lazy.ahead`.

:class:`RegistrySpecs` is the production :class:`SpecSource`: :class:`snapshotter.lazy.index_reader.IndexReader`
over :class:`bootseer.registry.RegistryClient` (hosts.toml mirrors, docker credentials, bearer tokens),
whose endpoints and auth become the blob's :class:`~snapshotter.lazy.spec.BlobSpec` and
:class:`~snapshotter.lazy.spec.AuthHook`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import urlparse

from bootseer import events
from snapshotter.lazy.ahead import SetUpAhead, ahead_owner
from snapshotter.lazy.lookups import Lookups, LookupUnavailable
from snapshotter.lazy.manager import LayerManager
from snapshotter.lazy.spec import BlobSpec, TlsSettings, wire_fields
from snapshotter.metastore import Record
from snapshotter.remote import (
    LABEL_CRI_IMAGE_LAYERS,
    LABEL_CRI_IMAGE_REF,
    LABEL_CRI_LAYER_DIGEST,
    LABEL_CRI_MANIFEST_DIGEST,
    RemoteLayer,
    RemoteRequest,
)

if TYPE_CHECKING:
    from bootseer.auth import CredentialSource
    from bootseer.registry import RegistryClient
    from bootseer.trust import TrustPolicy
    from snapshotter.lazy.index_reader import IndexReader

log = logging.getLogger("bootseer.lazy.handler")

LABEL_BLOB = "containerd.io/snapshot/bootseer.blob"  # on remote snapshots: the EROFS blob digest
REMOTE_NAME = "bootseer"
T = TypeVar("T")
REFRESH_DEADLINE = 30.0  # seconds for a token refresh after a 401 on a lazy read, retries included


class SpecSource(Protocol):
    """``(image ref, manifest digest, layer digest)`` → the layer's EROFS blob, or None (no index / not
    converted).  May raise: the caller falls back to the ordinary pull."""

    def __call__(self, image_ref: str, manifest_digest: str, layer_digest: str) -> BlobSpec | None: ...


class PrefetchHook(Protocol):
    """The hot-block prefetcher as the handler sees it (:class:`~snapshotter.lazy.prefetcher.HotBlockPrefetcher`).

    Both methods run in the Prepare's thread, so they only start work and return at once; errors are logged
    and never fail the Prepare."""

    def lookup(self, image_ref: str, manifest_digest: str) -> None:
        """A Prepare of the image begins: start looking up its hot-block manifest, so that it is at hand when
        the layer is mounted."""
        ...

    def on_mount(self, image_ref: str, manifest_digest: str, layer_digest: str, spec: BlobSpec) -> None:
        """A layer was just mounted lazily: start prefetching its recorded ranges."""
        ...


def owner_of(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


class LazyHandler:
    """Implements :class:`snapshotter.remote.RemoteHandler` over a started :class:`LayerManager`."""

    def __init__(self, manager: LayerManager, specs: SpecSource, name: str = REMOTE_NAME,
                 prefetch: PrefetchHook | None = None, *, ahead: int = 4, ahead_hold: float = 60.0) -> None:
        self.manager = manager
        self.specs = specs
        self.name = name
        self.prefetch = prefetch
        self._recorded: Callable[[str, str], bool] | None = None
        # ``ahead`` set-ups at once per pull (0: none), each held at most ``ahead_hold`` s without its Prepare
        self.ahead = SetUpAhead(manager, specs, self._start_prefetch, workers=ahead, hold=ahead_hold)

    def bind(self, recorded: Callable[[str, str], bool]) -> None:
        """``recorded(namespace, name)``: whether the core holds that snapshot.  Two Prepares of one layer
        racing share one owner (the chain ID); the loser's release must not drop the winner's hold."""
        self._recorded = recorded

    def prepare(self, req: RemoteRequest) -> RemoteLayer | None:
        image = req.labels.get(LABEL_CRI_IMAGE_REF, "")
        manifest = req.labels.get(LABEL_CRI_MANIFEST_DIGEST, "")
        layer = req.labels.get(LABEL_CRI_LAYER_DIGEST, "")
        if not (image and manifest and layer):
            log.debug("%s: no CRI labels (image ref, manifest and layer digest); ordinary pull", req.key)
            return None
        self._look_up_hot_blocks(image, manifest)  # while this layer is set up
        spec = self.specs(image, manifest, layer)
        if spec is not None and not self._chain_matches(req, image, manifest, layer):
            spec = None
        following = req.labels.get(LABEL_CRI_IMAGE_LAYERS, "").split(",")
        following = following[following.index(layer) + 1:] if layer in following else []
        if spec is None:
            log.info("layer %s of %s has no lazy blob; ordinary pull", layer[:19], image)
            self.ahead.queue(image, manifest, following)  # the layers above it may be lazy
            return None
        owner = owner_of(req.namespace, req.target)
        ahead = self.ahead.claim(manifest, layer)  # set up ahead: this Prepare takes its hold over
        replaces = ahead_owner(manifest, layer) if ahead is not None and ahead.blob == spec.digest else None
        try:
            with events.span("image_mount", component="bootseer snapshotter", image=image, layer=layer,
                             blob=spec.digest):
                lower = self.manager.acquire(spec, owner, replaces=replaces)
        except BaseException:
            if ahead is not None:  # its timer is cancelled: nothing else would drop the provisional hold
                self.manager.release(ahead_owner(manifest, layer), ahead.blob)
            raise
        if ahead is not None and replaces is None:  # set up ahead on another blob (re-converted meanwhile)
            self.manager.release(ahead_owner(manifest, layer), ahead.blob)
        log.info("layer %s of %s is lazy: blob %s at %s", layer[:19], image, spec.digest[:19], lower)
        started = (ahead is not None and replaces is not None and ahead.prefetch_started
                   and ahead.layer is self.manager.layer(spec.digest))  # its set-up started this mount's prefetch
        if not started:
            self._start_prefetch(image, manifest, layer, spec)
        self.ahead.queue(image, manifest, following)
        return RemoteLayer(lower=lower, name=self.name, size=spec.size, inodes=0, labels={LABEL_BLOB: spec.digest})

    def _chain_matches(self, req: RemoteRequest, image: str, manifest: str, layer: str) -> bool:
        """Whether the chain ID this Prepare commits to (``containerd.io/snapshot.ref``) is the one the image's
        config gives the layer: the snapshot is committed under that name, and any later image whose config
        yields that chain ID gets these bytes without containerd checking them.  A spec source that cannot
        tell (tests' fixed specs) is not asked."""
        chain_ids = getattr(self.specs, "chain_ids", None)
        if chain_ids is None:
            return True
        try:
            want = chain_ids(image, manifest, layer)
        except LookupUnavailable as e:
            log.warning("%s: layer %s of %s not lazy: config lookup: %s; ordinary pull", req.key, layer[:19],
                        image, e)
            return False
        if req.target in want:
            return True
        log.warning("%s: Prepare of layer %s of %s names chain ID %s, the image's config gives %s; ordinary "
                    "pull", req.key, layer[:19], image, req.target[:19], ", ".join(w[:19] for w in want) or "none")
        return False

    def hint(self, image: str, manifest: str, layers: list[str]) -> None:
        """A pull of ``image`` (resolved to ``manifest`` with ``layers``, bottom up) is about to send its
        Prepares: look up the hot-block manifest and set every layer up ahead now, each held provisionally
        and its prefetch started, for the Prepares to take over (``bootseer pull`` sends this first, so the
        prefetch does not wait for the pull's own client to start — see :mod:`snapshotter.lazy.ahead`)."""
        self._look_up_hot_blocks(image, manifest)
        self.ahead.queue(image, manifest, layers)

    def _look_up_hot_blocks(self, image: str, manifest: str) -> None:
        """Start the hot-block manifest lookup; never fails a Prepare."""
        if self.prefetch is not None:
            try:
                self.prefetch.lookup(image, manifest)
            except Exception:
                log.exception("hot-block manifest lookup failed to start for %s", image)

    def _start_prefetch(self, image: str, manifest: str, layer: str, spec: BlobSpec) -> None:
        if self.prefetch is not None:
            try:
                self.prefetch.on_mount(image, manifest, layer, spec)
            except Exception:
                log.exception("prefetch hook failed for layer %s of %s", layer[:19], image)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for set-ups ahead still running and stop the hold timers (the holds go with the daemon)."""
        self.ahead.close(timeout)

    def release(self, record: Record) -> None:
        self.manager.release(owner_of(record.ns, record.key), record.labels.get(LABEL_BLOB))

    def discard(self, req: RemoteRequest, layer: RemoteLayer) -> None:
        """The core could not record the snapshot :meth:`prepare` answered ``layer`` for: drop its hold —
        unless a concurrent Prepare of the same layer recorded it first (both hold as one owner, the chain
        ID, and the winner's snapshot needs the hold)."""
        if self._recorded is not None and self._recorded(req.namespace, req.target):
            log.info("%s: a concurrent Prepare recorded it first; its hold stays", req.target)
            return
        self.manager.release(owner_of(req.namespace, req.target), layer.labels.get(LABEL_BLOB))

    def collect(self, records: list[Record]) -> list[str]:
        owners = {owner_of(r.ns, r.key) for r in records if r.labels.get(LABEL_BLOB)}
        # set-ups ahead hold their layers provisionally until their Prepare (or their timer) takes over
        gone = self.manager.retain(owners, spare=lambda o: o.startswith("ahead/"),
                                   grace=self.manager.config.collect_grace)
        if gone:
            log.info("cleanup: released %d lazy layers no snapshot uses", len(gone))
        return gone + self.manager.evict()

    def restore(self, records: list[Record]) -> None:
        owners = {owner_of(r.ns, r.key) for r in records if r.labels.get(LABEL_BLOB)}
        gone = self.manager.retain(owners)
        if gone:
            log.info("released %d lazy layers no snapshot uses any more", len(gone))
        for r in records:
            digest = r.labels.get(LABEL_BLOB)
            if digest and self.manager.mountpoint(digest) is None:
                log.error("remote snapshot %s/%s: its lazy layer %s is not mounted (cache gone?); containers "
                          "using it will fail until the image is pulled again", r.ns, r.key, digest[:19])


# ------------------------------------------------------------------------------------- the registry
class RegistryAuthHook:
    """:class:`~snapshotter.lazy.spec.AuthHook` over :class:`bootseer.registry.RegistryClient`'s authenticator.

    The first request goes with whatever token the client holds for the blob's repository (none for an
    anonymous registry); after a 401 (``refresh=True``) a ``HEAD`` of the blob through the client runs the
    challenge / token flow, and the token it obtained is used.  Tokens stay in memory only."""

    def __init__(self, client: RegistryClient, registries: Mapping[str, str]) -> None:
        self.client = client
        self.registries = registries  # endpoint base URL → registry name (docker.io, host:port)

    def __call__(self, spec: BlobSpec, base: str, *, refresh: bool) -> Mapping[str, str]:
        from bootseer.reference import Reference

        host = urlparse(base).netloc  # the endpoint's own host: a mirror gets what its credentials earned
        scopes = (f"repository:{spec.repository}:pull",)
        if refresh:
            registry = self.registries.get(spec.registry, urlparse(spec.registry).netloc)
            try:
                # a deadline of its own: the fetch that asked waits on it (a tarpit realm must not hold it)
                with self.client.deadline(REFRESH_DEADLINE):
                    self.client.blob_exists(Reference(registry, spec.repository), spec.fetch_digest)
            except Exception as e:  # the fetch then fails with the registry's own answer
                log.warning("token refresh for %s/%s failed: %s", host, spec.repository, e)
        header = self.client.auth.cached_header(host, scopes)
        return {"Authorization": header} if header else {}

    def tls(self, spec: BlobSpec, base: str) -> TlsSettings | None:
        """The :class:`~snapshotter.lazy.spec.TlsHook`: the CA and client certificate ``hosts.toml`` gives the
        endpoint ``base`` (a layer restored after a restart has no lookup behind it: its registry is found from
        the spec's upstream URL, as for auth)."""
        registry = self.registries.get(spec.registry, urlparse(spec.registry).netloc)
        try:
            endpoints = self.client.hosts.endpoints(registry)
        except ValueError as e:  # a broken hosts.toml: the defaults, and the read fails loudly if they are wrong
            log.warning("hosts.toml of %s: %s", registry, e)
            return None
        for ep in endpoints:
            if ep.base.removesuffix("/v2") == base:
                return ep.verify, ep.client_cert
        return None


class RegistrySpecs:
    """:class:`SpecSource` reading BootSeer indexes from the image's registry (with a disk cache).

    A lookup's requests (referrers, index manifest and blob, config) retry transient errors within one
    deadline, ``lookup_timeout``, and run through :class:`~snapshotter.lazy.lookups.Lookups`: off the gRPC
    worker that waits for them, at most ``lookup_concurrency`` at once per registry.  Past the deadline, or
    with its registry's slots taken by slow lookups, the layer is pulled the ordinary way."""

    def __init__(self, client: RegistryClient, reader: IndexReader, *, lookup_timeout: float = 30.0,
                 lookup_concurrency: int = 4) -> None:
        # (the reader's trust policy decides which index is used; :meth:`IndexReader.bound` ties its entry to
        # the pulled manifest and config)
        self.client = client
        self.reader = reader
        self.registries: dict[str, str] = {}
        self.auth = RegistryAuthHook(client, self.registries)
        self.lookup_timeout = lookup_timeout
        self.lookups = Lookups(lookup_timeout, lookup_concurrency)

    @classmethod
    def create(cls, *, hosts_dir: str | None, plain_http: bool, docker_config: str | None,
               cache_dir: Path, policy: TrustPolicy | None = None, lookup_timeout: float = 30.0,
               lookup_concurrency: int = 4, credentials: CredentialSource | None = None) -> RegistrySpecs:
        """``credentials``: a source asked instead of the docker config (kubelet's pull secrets, which fall
        back to it themselves)."""
        from bootseer.registry import RegistryClient
        from snapshotter.lazy.index_reader import IndexReader

        source = credentials if credentials is not None else docker_config or None
        client = RegistryClient(hosts_dir=hosts_dir, credentials=source, plain_http=plain_http, retries=6,
                                read_timeout=30.0)  # (the lookup's deadline bounds the retries)
        return cls(client, IndexReader(client, cache_dir=cache_dir, policy=policy), lookup_timeout=lookup_timeout,
                   lookup_concurrency=lookup_concurrency)

    def _lookup(self, image_ref: str, manifest_digest: str, key: tuple[str, ...], fn: Callable[[], T]) -> T:
        from bootseer.reference import Reference

        if self.reader.answered(image_ref, manifest_digest):  # from memory: no request, no thread needed
            return fn()

        def bounded() -> T:
            with self.client.deadline(self.lookup_timeout):  # the thread's own requests end too
                return fn()

        return self.lookups.run(Reference.parse(image_ref).registry, key, bounded)

    def chain_ids(self, image_ref: str, manifest_digest: str, layer_digest: str) -> list[str]:
        """The chain IDs the image's config gives ``layer_digest`` (one per position it has in the manifest)."""
        img = self._lookup(image_ref, manifest_digest, ("image", image_ref, manifest_digest),
                           lambda: self.reader.image_layers(image_ref, manifest_digest))
        return [img.chain_id(i) for i in img.positions(layer_digest)]

    def __call__(self, image_ref: str, manifest_digest: str, layer_digest: str) -> BlobSpec | None:
        from bootseer.reference import Reference
        from snapshotter.lazy.index_reader import ImageMismatch

        try:
            found = self._lookup(image_ref, manifest_digest, ("layer", image_ref, manifest_digest, layer_digest),
                                 lambda: self.reader.bound(image_ref, manifest_digest, layer_digest))
        except ImageMismatch as e:  # the ordinary pull, where containerd checks the diffID itself
            log.warning("layer %s of %s not lazy: %s", layer_digest[:19], image_ref, e)
            return None
        except LookupUnavailable as e:
            log.warning("layer %s of %s not lazy: index lookup: %s; ordinary pull", layer_digest[:19], image_ref, e)
            return None
        if found is None:
            return None
        blob = found[0]
        ref = Reference.parse(blob.source or image_ref)
        bases: list[str] = []
        for ep in self.client.hosts.endpoints(ref.registry, "pull"):
            if ep.base.endswith("/v2"):  # an override_path endpoint does not take /v2/<repo>/blobs URLs
                base = ep.base.removesuffix("/v2")
                bases.append(base)
                self.registries[base] = ref.registry
        if not bases:
            raise RuntimeError(f"{ref.registry}: no endpoint to fetch lazy blobs from")
        return BlobSpec(registry=bases[-1], mirrors=tuple(bases[:-1]), repository=ref.repository,
                        digest=blob.blob.digest, size=blob.blob.size, chunk_size=blob.chunk_size,
                        chunks=tuple(blob.chunks), **wire_fields(blob))
