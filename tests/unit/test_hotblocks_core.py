"""The hot-block manifest core: access records → ordered, de-duplicated, coalesced, chunk-aligned ranges;
Parquet round trip; merge; validation against the image; the registry artifact (a real docker-registry)."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bootseer import hotblocks
from bootseer.accesslog import Access, read_access_log
from bootseer.hotblocks import (
    META_KEY,
    BadManifest,
    BlobInfo,
    HotBlockManifest,
    build,
    merge,
)
from bootseer.reference import Reference
from bootseer.registry import MT_OCI_MANIFEST, Descriptor, RegistryClient, sha256_digest
from snapshotter.lazy.testing import Registry

MiB = 1 << 20
SUBJECT = "sha256:" + "a" * 64
LAYER_DATA = [b"layer zero", b"layer one"]  # pushed as the stand-in image's layer blobs
L0, L1 = ("sha256:" + hashlib.sha256(d).hexdigest() for d in LAYER_DATA)
B0, B1 = "sha256:" + "b" * 64, "sha256:" + "c" * 64
BLOBS = {B0: BlobInfo(L0, 10 * MiB + 123, MiB), B1: BlobInfo(L1, 40 * MiB, MiB)}
MS = 1_000_000


def acc(blob: str, off: int, length: int, t_ms: int) -> Access:
    return Access(blob, off, length, 5_000 * MS + t_ms * MS)


def test_ranges_are_chunk_aligned_deduplicated_and_ordered_by_first_access() -> None:
    log = [acc(B1, 20 * MiB + 5, 100, 0),  # chunk 20 of B1 first
           acc(B0, 0, 4096, 1),  # superblock of B0
           acc(B0, 3 * MiB + 10, 10, 2), acc(B0, 3 * MiB + 900_000, 200_000, 3),  # chunks 3 and 4 (spans)
           acc(B1, 20 * MiB, 4096, 4),  # chunk 20 again: keeps its first access
           acc(B0, 10 * MiB, 4096, 5)]  # the short last chunk of B0
    hb = build(SUBJECT, BLOBS, log, command=["true"])
    got = [(r.layer_digest, r.offset, r.length, r.first_access_ns // MS, r.seq) for r in hb.ranges]
    assert got == [(L1, 20 * MiB, MiB, 0, 0), (L0, 0, MiB, 1, 1), (L0, 3 * MiB, 2 * MiB, 2, 2),
                   (L0, 10 * MiB, 123, 5, 3)]
    assert hb.ranges_for(L0) == [(0, MiB, 1 * MS), (3 * MiB, 2 * MiB, 2 * MS), (10 * MiB, 123, 5 * MS)]
    assert hb.hot_bytes() == 4 * MiB + 123 and hb.hot_bytes(L1) == MiB
    assert hb.commands == [["true"]]
    # what the reads asked for, in distinct 4 KiB pages: B1 one page; B0 1 + 1 + 50 (200 kB across pages) + 1
    assert hb.read_bytes == {B1: 4096, B0: 53 * 4096}


def test_accesses_of_other_blobs_and_outside_the_blob_are_dropped() -> None:
    # (times count from the first access of any of the image's blobs)
    other = "sha256:" + "d" * 64
    hb = build(SUBJECT, BLOBS, [acc(other, 0, 4096, 0), acc(B0, 50 * MiB, 4096, 1), acc(B0, MiB, 0, 2),
                                acc(B0, 2 * MiB, 1, 3)])
    assert [(r.offset, r.length, r.first_access_ns) for r in hb.ranges] == [(2 * MiB, MiB, 2 * MS)]


def test_coalescing_gaps_size_cap_and_time_window() -> None:
    seq = [acc(B1, i * MiB, 4096, i) for i in range(12)]  # a sequential read of 12 chunks, 1 ms apart
    hb = build(SUBJECT, BLOBS, seq, max_range=8 * MiB)
    assert [(r.offset // MiB, r.length // MiB) for r in hb.ranges] == [(0, 8), (8, 4)]  # cut at max_range
    # the same chunks read a second apart: each stays its own range, so the order follows the reads
    slow = [acc(B1, i * MiB, 4096, i * 1000) for i in range(3)]
    assert len(build(SUBJECT, BLOBS, slow).ranges) == 3
    # a one-chunk hole: kept apart by default, bridged with gap >= one chunk
    holes = [acc(B1, 0, 10, 0), acc(B1, 2 * MiB, 10, 1)]
    assert [r.length for r in build(SUBJECT, BLOBS, holes).ranges] == [MiB, MiB]
    bridged = build(SUBJECT, BLOBS, holes, gap=MiB).ranges
    assert [(r.offset, r.length) for r in bridged] == [(0, 3 * MiB)]


def test_parquet_round_trip_keeps_everything_and_documented_schema() -> None:
    hb = build(SUBJECT, BLOBS, [acc(B0, 0, 10, 0), acc(B1, 7 * MiB, 10, 3)], command=["python3", "-c", "x"])
    data = hb.to_parquet()
    back = HotBlockManifest.from_parquet(data)
    assert back.ranges == hb.ranges and back.blobs == hb.blobs and back.subject == SUBJECT
    assert back.commands == [["python3", "-c", "x"]] and back.recordings == 1 and back.read_bytes == hb.read_bytes
    table = pq.read_table(io.BytesIO(data), use_threads=False)
    assert table.column_names == ["layer_digest", "blob_digest", "offset", "length", "first_access_ns", "seq"]
    meta = json.loads(table.schema.metadata[META_KEY])
    assert meta["version"] == 1
    assert meta["blobs"][0] == {"digest": B0, "layer": L0, "size": 10 * MiB + 123, "chunk_size": MiB}
    assert list(back.blobs) == [B0, B1]  # image order survives (it breaks ties in the order)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no-meta", "outside-blob", "unknown-blob", "bad-seq"])
def test_corrupt_manifests_are_rejected(damage: str) -> None:
    hb = build(SUBJECT, BLOBS, [acc(B0, 0, 10, 0), acc(B1, 7 * MiB, 10, 3)])
    data = hb.to_parquet()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"PAR1" + secrets.token_bytes(300) + b"PAR1"
    else:
        table = pq.read_table(io.BytesIO(data), use_threads=False)
        if damage == "no-meta":
            table = table.replace_schema_metadata({})
        elif damage == "outside-blob":
            table = table.set_column(2, "offset", pa.array([0, 40 * MiB], pa.int64()))
        elif damage == "unknown-blob":
            table = table.set_column(1, "blob_digest", pa.array([B0, B0]).dictionary_encode())
        elif damage == "bad-seq":
            table = table.set_column(5, "seq", pa.array([0, 0], pa.int64()))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
    with pytest.raises(BadManifest):
        HotBlockManifest.from_parquet(data)


def test_merge_is_a_union_ordered_by_earliest_first_access() -> None:
    a = build(SUBJECT, BLOBS, [acc(B0, 0, 10, 0), acc(B1, 5 * MiB, 10, 10), acc(B1, 9 * MiB, 10, 20)],
              command=["a"])
    b = build(SUBJECT, BLOBS, [acc(B1, 9 * MiB, 10, 0), acc(B0, 2 * MiB, 10, 5)], command=["b"])
    m = merge(a, b)
    assert [(r.blob_digest, r.offset // MiB, r.first_access_ns // MS) for r in m.ranges] == [
        (B0, 0, 0), (B1, 9, 0), (B0, 2, 5), (B1, 5, 10)]  # ties: image layer order, then offset
    assert m.recordings == 2 and m.commands == [["a"], ["b"]]
    assert merge(m, a).ranges == m.ranges  # idempotent
    other = build("sha256:" + "e" * 64, BLOBS, [])
    with pytest.raises(BadManifest):
        merge(a, other)
    rechunked = build(SUBJECT, {B0: BlobInfo(L0, 10 * MiB + 123, 2 * MiB)}, [acc(B0, 0, 10, 0)])
    with pytest.raises(BadManifest):
        merge(a, rechunked)


def test_check_against_the_image() -> None:
    hb = build(SUBJECT, BLOBS, [acc(B0, 0, 10, 0)])
    hb.check([L0, L1], {L0: B0, L1: B1})
    with pytest.raises(BadManifest, match="not a layer of the image"):
        hb.check([L0, "sha256:" + "9" * 64])
    with pytest.raises(BadManifest, match="index now says"):
        hb.check([L0, L1], {L0: "sha256:" + "f" * 64})


def test_summary_shares_and_spread() -> None:
    hb = build(SUBJECT, BLOBS, [acc(B0, 0, 10, 0), acc(B1, 0, 10, 500), acc(B1, 30 * MiB, 10, 1000)])
    s = hb.summary(buckets=2)
    assert s["hot_bytes"] == 3 * MiB and s["ranges"] == 3
    assert s["share_of_image"] == round(3 * MiB / (50 * MiB + 123), 4)
    assert [ly["hot_bytes"] for ly in s["layers"]] == [MiB, 2 * MiB]
    assert s["layers"][1]["share_of_layer"] == 0.05
    assert [p["hot_bytes"] for p in s["spread"]] == [2 * MiB, 3 * MiB] and s["duration_s"] == 1.0


def test_access_log_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text(json.dumps({"blob": B0, "offset": 0, "length": 4096, "t_ns": 1}) + "\n"
                 + json.dumps({"blob": B1, "offset": 0, "length": 4096, "t_ns": 2}) + "\n" + '{"blob": "sha')
    assert [a.blob for a in read_access_log(str(p))] == [B0, B1]
    assert [a.blob for a in read_access_log(str(p), [B1])] == [B1]
    p.write_text("not json\n" + json.dumps({"blob": B0, "offset": 0, "length": 1, "t_ns": 1}) + "\n")
    with pytest.raises(ValueError, match=":1: bad access record"):
        read_access_log(str(p))


# ------------------------------------------------------------------------------------------- registry
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("hbreg")).start()
    try:
        yield reg
    finally:
        reg.stop()


def _image(client: RegistryClient, ref: str, layers: list[str], *, own: bytes | None = None,
           annotations: dict[str, str] | None = None) -> Descriptor:
    """A stand-in image manifest with ``layers`` (digests of ``LAYER_DATA``), then ``own``'s layer if given."""
    data = {sha256_digest(d): d for d in LAYER_DATA}
    if own is not None:
        data[sha256_digest(own)] = own
        layers = [*layers, sha256_digest(own)]
    for d in data.values():
        client.push_blob(ref, d)
    cfg = client.push_blob(ref, b'{"rootfs":{"type":"layers","diff_ids":[]}}')
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg.digest, "size": cfg.size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(data[d])}
                   for d in layers]}
    if annotations:
        doc["annotations"] = annotations
    raw = json.dumps(doc).encode()
    digest = client.put_manifest(ref, raw, MT_OCI_MANIFEST)
    return Descriptor(MT_OCI_MANIFEST, digest, len(raw))


def test_push_fetch_merge_and_ignore_bad_artifacts(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    client = RegistryClient(plain_http=True)
    host = registry.url.removeprefix("http://")
    ref = f"{host}/hb/img{secrets.token_hex(3)}:v1"
    subject = _image(client, ref, [L0, L1])
    assert hotblocks.fetch(client, ref, subject.digest) is None  # nothing recorded yet

    a = build(subject.digest, BLOBS, [acc(B0, 0, 10, 0), acc(B1, 5 * MiB, 10, 10)], command=["a"])
    d1 = hotblocks.push(client, ref, subject, a)
    found = hotblocks.fetch(client, ref, subject.digest, image_layers=[L0, L1], index_blobs={L0: B0, L1: B1})
    assert found is not None and found.digest == d1 and found.manifest.ranges == a.ranges
    man = client.get_manifest(f"{ref.rsplit(':', 1)[0]}@{d1}")
    assert man.artifact_type == hotblocks.ARTIFACT_TYPE and man.subject and man.subject.digest == subject.digest
    assert man.layers[0].media_type == hotblocks.PARQUET_MEDIA_TYPE

    # a newer recording, merged: the newest artifact wins
    b = build(subject.digest, BLOBS, [acc(B1, 9 * MiB, 10, 0)], command=["b"])
    b.created = "9999-01-01T00:00:00Z"  # strictly newer than a's, whatever the clock says
    merged = merge(found.manifest, b)
    merged.created = b.created
    d2 = hotblocks.push(client, ref, subject, merged)
    again = hotblocks.fetch(client, ref, subject.digest)
    assert again is not None and again.digest == d2 and again.manifest.recordings == 2
    assert {r.offset // MiB for r in again.manifest.ranges} == {0, 5, 9}

    # the image's layers are not the ones recorded: ignored with a warning
    caplog.clear()
    assert hotblocks.fetch(client, ref, subject.digest, image_layers=[L0]) is None
    assert "not a layer of the image" in caplog.text

    # a corrupt newest artifact: ignored with a warning (not an exception, not an older manifest)
    bad = b"PAR1 this is not parquet PAR1"
    blob = client.push_blob(ref, bad)
    client.push_blob(ref, b"{}")
    raw = json.loads(hotblocks.artifact_manifest(Descriptor(hotblocks.PARQUET_MEDIA_TYPE, blob.digest, blob.size),
                                                subject, merged))
    raw["annotations"][hotblocks.ANN_PREFIX + "created"] = "9999-12-31T00:00:00Z"
    client.push_referrer(ref, json.dumps(raw).encode(), MT_OCI_MANIFEST)
    caplog.clear()
    assert hotblocks.fetch(client, ref, subject.digest) is None
    assert "ignored" in caplog.text


def test_prefetcher_lookup_ignores_unusable_manifests(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    """The snapshotter's side: a manifest of another blob of the layer, of layers the image lacks, or a corrupt
    one gives no plan (and a warning), never an exception or a wrong plan; a good one gives the layer's ranges
    in first-access order."""
    from prometheus_client import CollectorRegistry

    from snapshotter.lazy.prefetcher import HotBlockPrefetcher, plan

    client = RegistryClient(plain_http=True)
    host = registry.url.removeprefix("http://")
    ref = f"{host}/hb/pf{secrets.token_hex(3)}:v1"
    subject = _image(client, ref, [L0, L1])
    hot = HotBlockPrefetcher(None, client, registry=CollectorRegistry(), reuse_for=0)  # type: ignore[arg-type]
    assert hot.manifest(ref, subject.digest) is None  # none yet

    hb = build(subject.digest, BLOBS, [acc(B1, 9 * MiB, 10, 0), acc(B0, 0, 10, 1), acc(B1, 2 * MiB, 10, 2)])
    hotblocks.push(client, ref, subject, hb)
    got = hot.manifest(ref, subject.digest)
    assert got is not None and got.ranges == hb.ranges
    assert plan(got, L1, B1) == [(9 * MiB, MiB, 0), (2 * MiB, MiB, 2_000_000)]  # with first-access times
    assert plan(got, L1, "sha256:" + "f" * 64) is None  # recorded on another blob of that layer
    assert plan(got, "sha256:" + "9" * 64, B1) == []  # a layer the recording did not see

    caplog.clear()  # the index now names another blob for L0: the whole manifest is ignored
    assert hot.manifest(ref, subject.digest, {L0: "sha256:" + "f" * 64}) is None
    assert "index now says" in caplog.text

    # a manifest naming a layer the image does not have (recorded for another image, attached here)
    stranger = build(subject.digest, {B0: BlobInfo("sha256:" + "7" * 64, 10 * MiB, MiB)}, [acc(B0, 0, 1, 0)])
    stranger.created = "9999-01-01T00:00:00Z"
    hotblocks.push(client, ref, subject, stranger)
    caplog.clear()
    assert hot.manifest(ref, subject.digest) is None
    assert "not a layer of the image" in caplog.text


def test_layers_of_one_start_up_share_its_time_zero() -> None:
    from prometheus_client import CollectorRegistry

    from snapshotter.lazy.prefetcher import HotBlockPrefetcher

    hot = HotBlockPrefetcher(None, None, registry=CollectorRegistry(), start_window=30.0)  # type: ignore[arg-type]
    with hot._lock:
        assert hot._start_of("sha256:m", 100.0) == 100.0  # the image's first Prepare
        assert hot._start_of("sha256:m", 100.4) == 100.0  # its next layer: same time zero
        assert hot._start_of("sha256:other", 100.5) == 100.5
        assert hot._start_of("sha256:m", 200.0) == 200.0  # long after: a new start-up of the image


def test_early_lookup_has_the_manifest_at_hand_for_the_first_layer(registry: Registry) -> None:
    """The handler calls ``lookup`` as a Prepare begins: the manifest is fetched in the background (once, however
    many Prepares ask meanwhile) and the layer's own lookup then finds it parsed and cached."""
    from prometheus_client import CollectorRegistry

    from bootseer.testkit import wait_until
    from snapshotter.lazy.prefetcher import HotBlockPrefetcher

    client = RegistryClient(plain_http=True)
    host = registry.url.removeprefix("http://")
    ref = f"{host}/hb/early{secrets.token_hex(3)}:v1"
    subject = _image(client, ref, [L0, L1])
    hb = build(subject.digest, BLOBS, [acc(B1, 9 * MiB, 10, 0), acc(B0, 0, 10, 1)])
    hotblocks.push(client, ref, subject, hb)
    hot = HotBlockPrefetcher(None, client, registry=CollectorRegistry(), reuse_for=60)  # type: ignore[arg-type]
    hot.lookup(ref, subject.digest)
    hot.lookup(ref, subject.digest)  # a second Prepare while the first lookup runs: no second lookup
    assert len(hot._threads) == 1
    wait_until(lambda: not hot._threads[0].is_alive(), 30, "the early lookup")
    key = (Reference.parse(ref).name, subject.digest)
    cached = hot._cache[key][2]
    assert cached is not None and cached.ranges == hb.ranges
    assert hot.manifest(ref, subject.digest) is cached  # the layer's lookup: from the cache, no new fetch
    hot.lookup("Not A Reference", subject.digest)  # a bad reference: nothing started, nothing raised
    assert len([t for t in hot._threads if t.is_alive()]) == 0


def test_an_image_without_a_recording_uses_its_bases_for_the_layers_they_share(registry: Registry) -> None:
    """A depsnap image (the base's layers + the install's) names its base in OCI's base annotations; until it is
    recorded itself, the base's hot ranges are prefetched for the shared layers (same layer, same blob) and
    none for its own layer.  An image naming a base that has no recording gets none."""
    from prometheus_client import CollectorRegistry

    from snapshotter.lazy.prefetcher import BASE_DIGEST, BASE_NAME, HotBlockPrefetcher, plan

    client = RegistryClient(plain_http=True)
    host = registry.url.removeprefix("http://")
    base_ref = f"{host}/hb/base{secrets.token_hex(3)}:v1"
    base = _image(client, base_ref, [L0, L1])
    hb = build(base.digest, BLOBS, [acc(B1, 9 * MiB, 10, 0), acc(B0, 0, 10, 1)])
    hotblocks.push(client, base_ref, base, hb)

    def derived(repo: str, base_name: str, base_digest: str) -> tuple[str, str]:
        ref = f"{host}/hb/{repo}{secrets.token_hex(3)}:v1"
        man = _image(client, ref, [L0, L1], own=b"the install's own layer",
                     annotations={BASE_NAME: base_name, BASE_DIGEST: base_digest})
        return ref, man.digest

    ref, digest = derived("deps", base_ref, base.digest)
    hot = HotBlockPrefetcher(None, client, registry=CollectorRegistry(), reuse_for=0)  # type: ignore[arg-type]
    got = hot.manifest(ref, digest)
    assert got is not None and got.subject == base.digest
    assert plan(got, L1, B1) == [(9 * MiB, MiB, 0)] and plan(got, L0, B0) == [(0, MiB, 1_000_000)]
    assert plan(got, "sha256:" + "9" * 64, B1) == []  # its own layer: nothing recorded
    assert hot.manifest(ref, digest, {L0: "sha256:" + "f" * 64}) is None  # its index re-converted L0: not used

    bare = f"{host}/hb/bare{secrets.token_hex(3)}:v1"
    other = _image(client, bare, [L0, L1])  # a base never recorded
    ref2, digest2 = derived("deps2", bare, other.digest)
    assert hot.manifest(ref2, digest2) is None
