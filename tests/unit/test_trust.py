"""Who may write an index, and what an index may say (issue 18 items 1 and 2), without a registry: cosign-format
signatures made and checked with the ``cryptography`` library, the nodes' trust policy, and the bounds the
index parser enforces before it materialises anything a registry sent."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bootseer.index import (
    FORMAT_VERSION,
    INDEX_MEDIA_TYPE,
    MAX_CHUNK_SIZE,
    MAX_INDEX_BYTES,
    MAX_LAYERS,
    BadIndex,
    ImageIndex,
    UnsupportedIndex,
)
from bootseer.trust import Signer, TrustError, TrustPolicy, Verifier, generate_keypair, load_public_key
from snapshotter.lazy.index_reader import ImageLayers

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("a", "b"):
        generate_keypair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
        out[name] = tmp_path / name
    return out


def test_signature_round_trip_and_what_it_refuses(keys: dict[str, Path]) -> None:
    signer = Signer(f"{keys['a']}.key")
    payload = signer.payload("reg.example/team/img", DIGEST, signed_at=0)
    sig = signer.sign(payload)
    trusted = Verifier.from_files([f"{keys['a']}.pub"])
    v = trusted.check(DIGEST, payload, sig)
    assert v is not None and v.key_id == signer.key_id and v.signed_at == "1970-01-01T00:00:00Z"
    # the payload is cosign's simple-signing document
    doc = json.loads(payload)
    assert doc["critical"]["type"] == "cosign container image signature"
    assert doc["critical"]["image"]["docker-manifest-digest"] == DIGEST
    # another key's signature, a payload changed after signing, a signature of another artifact, garbage
    assert Verifier.from_files([f"{keys['b']}.pub"]).check(DIGEST, payload, sig) is None
    assert trusted.check(DIGEST, payload.replace(b"1970", b"2999"), sig) is None
    other = "sha256:" + "cd" * 32
    assert trusted.check(other, payload, sig) is None  # a good signature, of another digest
    assert trusted.check(DIGEST, payload, "not base64!") is None
    assert trusted.check(DIGEST, payload, base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()) is None
    # a verified payload that is not a cosign signature document is refused too
    odd = json.dumps({"critical": {"type": "something else", "image": {"docker-manifest-digest": DIGEST}}}).encode()
    assert trusted.check(DIGEST, odd, signer.sign(odd)) is None


def test_keys_private_key_is_root_only_and_other_key_types_are_refused(keys: dict[str, Path], tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(f"{keys['a']}.key").st_mode) == 0o600
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(rsa_pub.public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(TrustError, match="P-256"):
        load_public_key(tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(TrustError):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(TrustError):
        Signer(tmp_path / "missing.key")


def test_policy_most_specific_scope_wins_and_bad_tables_are_refused(keys: dict[str, Path]) -> None:
    pol = TrustPolicy.from_dict({
        "mode": "require", "keys": [f"{keys['a']}.pub"],
        "rules": [{"scope": "reg.example:5000/scratch", "mode": "prefer"},
                  {"scope": "reg.example:5000/scratch/public", "mode": "off"},
                  {"scope": "other.example", "mode": "require", "keys": [f"{keys['b']}.pub"]}]})
    assert pol.rule_for("reg.example:5000/team/img").mode == "require"
    assert pol.rule_for("reg.example:5000/scratch/x").mode == "prefer"
    assert pol.rule_for("reg.example:5000/scratch/public/y").mode == "off"
    assert pol.rule_for("reg.example:5000/scratchpad/z").mode == "require"  # a scope is a path prefix, not a string one
    a, b = Signer(f"{keys['a']}.key").key_id, Signer(f"{keys['b']}.key").key_id
    verifier = pol.rule_for("other.example/any").verifier
    assert verifier is not None and set(verifier.keys) == {b}
    inherited = pol.rule_for("reg.example:5000/scratch/x").verifier
    assert inherited is not None and set(inherited.keys) == {a}
    # the fingerprint names modes, scopes and keys: a disk cache made under another policy is not reused
    assert TrustPolicy.from_dict({"mode": "prefer", "keys": [f"{keys['a']}.pub"]}).fingerprint != \
        TrustPolicy.from_dict({"mode": "require", "keys": [f"{keys['a']}.pub"]}).fingerprint
    for bad in ({"mode": "maybe"}, {"mdoe": "require"}, {"rules": [{"mode": "off"}]},
                {"rules": [{"scope": "x", "mode": "off", "colour": "red"}]}):
        with pytest.raises(TrustError):
            TrustPolicy.from_dict(bad)


def _layer(**over: Any) -> dict[str, Any]:
    size = 3 * 4096 + 10
    d = {"digest": "sha256:" + "11" * 32, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 99,
         "diffID": "sha256:" + "22" * 32,
         "blob": {"mediaType": "application/vnd.bootseer.layer.v1.erofs", "digest": "sha256:" + "33" * 32,
                  "size": size},
         "chunkSize": 4096, "chunks": ["44" * 32] * 4}
    d.update(over)
    return d


def _index(layers: list[dict[str, Any]], version: Any = FORMAT_VERSION) -> bytes:
    return json.dumps({"schemaVersion": version, "mediaType": INDEX_MEDIA_TYPE, "subject": DIGEST,
                       "converter": {}, "layers": layers, "skipped": []}).encode()


def test_index_parse_bounds_before_anything_is_materialised() -> None:
    idx = ImageIndex.from_json(_index([_layer()]))
    lb = next(iter(idx.layers.values()))
    assert lb.diff_id == "sha256:" + "22" * 32 and lb.chunk_size == 4096
    assert ImageIndex.from_json(idx.to_json()).to_json() == idx.to_json()  # canonical round trip
    with pytest.raises(UnsupportedIndex, match="schema version 1"):  # an old index: the ordinary pull
        ImageIndex.from_json(_index([_layer()], version=1))
    with pytest.raises(UnsupportedIndex):  # a newer converter's: the ordinary pull
        ImageIndex.from_json(_index([_layer()], version=4))
    with pytest.raises(UnsupportedIndex):  # (a bool is not a version, though True == 1 in Python)
        ImageIndex.from_json(_index([_layer()], version=True))
    big = 64 << 30  # one chunk would be one 64 GiB bytearray on the node
    cases = [
        _layer(chunkSize=big, chunks=["44" * 32],
               blob={"mediaType": "x", "digest": "sha256:" + "33" * 32, "size": big}),
        _layer(chunkSize=MAX_CHUNK_SIZE + 1),
        _layer(chunkSize=0),
        _layer(chunks=["44" * 32] * 5),  # more digests than the blob has chunks
        _layer(chunks=["zz" * 32] * 4),
        _layer(diffID="sha256:short"),
        _layer(diffID=None),
        _layer(digest="md5:" + "11" * 16),
        _layer(blob={"mediaType": "x", "digest": "sha256:" + "33" * 32, "size": -1}),
    ]
    for layer in cases:
        with pytest.raises(BadIndex):
            ImageIndex.from_json(_index([layer]))
    with pytest.raises(BadIndex, match="layers"):
        ImageIndex.from_json(_index([_layer()] * (MAX_LAYERS + 1)))
    with pytest.raises(BadIndex, match="bytes"):
        ImageIndex.from_json(b" " * (MAX_INDEX_BYTES + 1))


def test_chain_ids_are_containerds() -> None:
    """The chain ID a Prepare carries is checked against the pulled config's: computed as the OCI image spec
    (and containerd's identity.ChainID) define it."""
    d = ["sha256:" + hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    img = ImageLayers(("l0", "l1", "l2"), tuple(d))
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    assert img.chain_id(0) == d[0]
    assert img.chain_id(1) == c1
    assert img.chain_id(2) == "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert ImageLayers(("x", "y", "x"), tuple(d)).positions("x") == [0, 2]

