"""The index reader the snapshotter calls on Prepare: answers from the registry once, then from memory and its
disk cache (counted at a proxy in front of the real registry), remembers a miss for a while but picks up a
conversion that lands later, and refuses a malformed index."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from bootseer.index import EROFS_MEDIA_TYPE, BadIndex, ImageIndex, LayerBlob, read_chunk
from bootseer.registry import Descriptor, RegistryClient
from integration import images
from integration.faultproxy import FaultProxy
from integration.stack import Stack
from registry_sidecar.convert import ImageConverter
from snapshotter.lazy.index_reader import IndexReader
from tests.convert_util import push_layout


def test_reader_caches_hits_misses_and_survives_restart(stack: Stack, tmp_path: Path) -> None:
    client = RegistryClient(plain_http=True)
    images.build_small(tmp_path / "small")
    repo = f"{stack.info.registry}/test/reader-{secrets.token_hex(4)}"
    ref, man = push_layout(client, tmp_path / "small", repo)
    layer = man.layers[1].digest
    with FaultProxy(stack.info.registry) as proxy:
        via = ref.replace(stack.info.registry, proxy.address)
        reader = IndexReader(RegistryClient(plain_http=True), cache_dir=tmp_path / "cache", negative_ttl=3600)
        assert reader.lookup(via, man.digest, layer) is None  # not converted yet
        asked = len(proxy.hits)
        assert asked > 0
        assert reader.lookup(via, man.digest, man.layers[0].digest) is None  # the miss is remembered
        assert len(proxy.hits) == asked
        ImageConverter(client).convert(ref)
        reader.invalidate(via, man.digest)  # e.g. told by the sidecar; otherwise after negative_ttl
        lb = reader.lookup(via, man.digest, layer)
        assert lb is not None and lb.layer_digest == layer and lb.blob.media_type == EROFS_MEDIA_TYPE
        assert lb.source == via.split("@")[0] and lb.chunk_count == -(-lb.blob.size // lb.chunk_size)
        off, n = lb.chunk_range(lb.chunk_count - 1)
        assert off + n == lb.blob.size
        assert lb.wire is not None and lb.wire.codec == "zstd"  # index v3 by default: only the wire blob is pushed
        assert lb.verify_chunk(0, read_chunk(client, ref, lb, 0))
        assert not lb.verify_chunk(0, b"\0" * lb.chunk_range(0)[1])
        asked = len(proxy.hits)
        assert reader.lookup(via, man.digest, man.layers[2].digest) is not None
        assert reader.lookup(via, man.digest, "sha256:" + "f" * 64) is None  # not a layer of this image
        assert len(proxy.hits) == asked  # from memory
        again = IndexReader(RegistryClient(plain_http=True), cache_dir=tmp_path / "cache")  # a restarted node
        assert again.lookup(via, man.digest, layer) == lb
        assert len(proxy.hits) == asked  # from the disk cache


def test_malformed_index_is_refused() -> None:
    good = LayerBlob("sha256:" + "1" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 10,
                     Descriptor(EROFS_MEDIA_TYPE, "sha256:" + "2" * 64, 3 << 20), 1 << 20,
                     ("a" * 64, "b" * 64, "c" * 64), diff_id="sha256:" + "4" * 64)
    idx = ImageIndex("sha256:" + "3" * 64, {good.layer_digest: good})
    assert ImageIndex.from_json(idx.to_json()) == idx
    doc = json.loads(idx.to_json())
    doc["layers"][0]["chunks"] = ["a" * 64, "b" * 64]  # too few chunk digests for the blob size
    with pytest.raises(BadIndex, match="2 chunk digests"):
        ImageIndex.from_json(json.dumps(doc).encode())
    with pytest.raises(BadIndex, match="not a BootSeer index"):
        ImageIndex.from_json(b'{"mediaType": "something/else", "schemaVersion": 1}')
    with pytest.raises(BadIndex):
        ImageIndex.from_json(b"[1, 2]")
