"""Who may write a BootSeer index: cosign-format signatures over the index artifact, and the nodes' trust policy.

A referrer is mutable — anyone with push rights on a repository can attach a newer one — so a node serves an
index only if it carries a signature from a key its policy trusts (docs/security.md).  The signature is
cosign's key-based format, so ``cosign verify --key index.pub <repo>@<index artifact digest>`` checks what the
node checks:

* the **payload** is cosign's "simple signing" JSON::

      {"critical": {"identity": {"docker-reference": "<registry>/<repository>"},
                    "image": {"docker-manifest-digest": "sha256:<index artifact manifest digest>"},
                    "type": "cosign container image signature"},
       "optional": {"io.bootseer.signed-at": "<RFC 3339 UTC>"}}

* the **signature** is ECDSA P-256 with SHA-256 over the payload bytes, ASN.1 DER, base64 (standard alphabet);
* both travel as a layer (media type :data:`SIMPLESIGNING_MEDIA_TYPE`, the payload as the blob, the signature
  in the :data:`SIGNATURE_ANNOTATION` annotation) of an OCI manifest tagged ``sha256-<hex>.sig`` in the same
  repository (cosign's tag scheme; several signatures are several layers).

Keys: a PKCS#8 PEM private key on the converter (:func:`generate_keypair`), the PEM public key
(SubjectPublicKeyInfo, what ``cosign verify --key`` takes) on the nodes.  All cryptography is the
``cryptography`` library's; nothing here implements a primitive.

``optional.io.bootseer.signed-at`` orders several signed indexes of one image: the node takes the newest
*signed* one, so an unsigned or forged referrer, however new, never displaces it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bootseer.reference import Reference
from bootseer.registry import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    MT_OCI_EMPTY,
    MT_OCI_MANIFEST,
    NotFound,
    RegistryClient,
    RegistryError,
    sha256_digest,
)

log = logging.getLogger(__name__)

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
SIGNED_AT = "io.bootseer.signed-at"
MAX_PAYLOAD_BYTES = 64 << 10  # a simple-signing payload is a few hundred bytes
MAX_SIGNATURES = 32  # layers of one .sig manifest looked at (cosign appends one per signing)
MODES = ("require", "prefer", "off")


class TrustError(ValueError):
    """A key or policy that cannot be used (unreadable file, wrong key type, unknown mode)."""


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-<hex>.sig``."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}.sig"


# ------------------------------------------------------------------------------------------------ keys
def generate_keypair(private_path: Path | str, public_path: Path | str) -> str:
    """A new ECDSA P-256 key pair: PKCS#8 PEM private key (mode 0600) and PEM public key; returns the public
    key's fingerprint (:func:`key_id`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(public_path).write_bytes(pub)
    return key_id(key.public_key())


def key_id(pub: ec.EllipticCurvePublicKey) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: names a key in logs and caches."""
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sha256_digest(der)


def load_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise TrustError(f"public key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TrustError(f"public key {path}: an ECDSA P-256 key is required (cosign's key type)")
    return key


class Signer:
    """Signs index artifacts with a PKCS#8 PEM ECDSA P-256 private key (unencrypted: the converter reads it
    unattended, so protect the file — a Kubernetes Secret, mode 0600)."""

    def __init__(self, private_key_path: Path | str) -> None:
        try:
            key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise TrustError(f"signing key {private_key_path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise TrustError(f"signing key {private_key_path}: an ECDSA P-256 key is required")
        self._key = key
        self.public_key = key.public_key()
        self.key_id = key_id(self.public_key)

    def payload(self, repository: str, digest: str, signed_at: float | None = None) -> bytes:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if signed_at is None else signed_at))
        doc = {"critical": {"identity": {"docker-reference": repository},
                            "image": {"docker-manifest-digest": digest}, "type": SIGNATURE_TYPE},
               "optional": {SIGNED_AT: when}}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def default_signer(explicit: Path | str | None) -> Signer | None:
    """The signer a converting command uses: ``explicit`` (its ``--signing-key``, or env
    ``BOOTSEER_SIGNING_KEY`` through the option), else the local stack's key while one is up (that stack's
    snapshotter trusts only its own key), else None (unsigned).  A key that cannot be read raises TrustError."""
    if explicit is None:
        from bootseer.localstack import local_stack_value

        stack_key = local_stack_value("signing_key")
        explicit = stack_key if stack_key and Path(stack_key).is_file() else None
    return Signer(explicit) if explicit is not None else None


def sign_artifact(client: RegistryClient, repo: Reference | str, digest: str, signer: Signer,
                  signed_at: float | None = None) -> str:
    """Sign the artifact ``digest`` in ``repo``: push the payload and add a layer to the ``sha256-<hex>.sig``
    manifest (cosign's layout).  Returns the signature manifest's digest."""
    ref = repo if isinstance(repo, Reference) else Reference.parse(repo)
    ref = ref.in_repository(ref.repository)
    payload = signer.payload(ref.name, digest, signed_at)
    sig = signer.sign(payload)
    pdesc = client.push_blob(ref, payload)
    client.push_blob(ref, EMPTY_JSON)
    tag = signature_tag(digest)
    layers: list[dict[str, Any]] = []
    try:  # keep earlier signatures (another key, a rotation): cosign appends too
        old = client.get_manifest(ref.with_tag(tag), accept=(MT_OCI_MANIFEST,))
        layers = [d for d in old.doc.get("layers") or [] if isinstance(d, dict)][: MAX_SIGNATURES - 1]
    except NotFound:
        pass
    layers.append({"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": pdesc.digest, "size": pdesc.size,
                   "annotations": {SIGNATURE_ANNOTATION: sig}})
    doc = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
           "config": {"mediaType": MT_OCI_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
           "layers": layers}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return client.put_manifest(ref, raw, MT_OCI_MANIFEST, reference=tag)


# ---------------------------------------------------------------------------------------------- verifying
@dataclass(frozen=True)
class Verified:
    """A good signature over an artifact: by which key, and when it says it was made."""

    digest: str
    key_id: str
    signed_at: str  # RFC 3339 UTC (sorts as text); "" if the payload carries none


class Verifier:
    """Checks cosign simple-signing signatures against a set of trusted public keys."""

    def __init__(self, keys: Iterable[ec.EllipticCurvePublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path | str]) -> Verifier:
        return cls(load_public_key(p) for p in paths)

    def check(self, digest: str, payload: bytes, signature_b64: str) -> Verified | None:
        """The verified signature if ``signature_b64`` is a good signature of ``payload`` by a trusted key and
        the payload names ``digest``; else None."""
        try:
            sig = base64.b64decode(signature_b64, validate=True)
        except ValueError:
            return None
        for kid, key in self.keys.items():
            try:
                key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            try:  # only a payload that verified is parsed
                doc = json.loads(payload)
                crit = doc["critical"]
                if crit["type"] != SIGNATURE_TYPE or crit["image"]["docker-manifest-digest"] != digest:
                    return None
                when = (doc.get("optional") or {}).get(SIGNED_AT, "")
            except (ValueError, KeyError, TypeError, AttributeError):
                return None
            return Verified(digest, kid, when if isinstance(when, str) else "")
        return None

    def verify_artifact(self, client: RegistryClient, repo: Reference, digest: str) -> Verified | None:
        """The newest good signature of ``digest`` in ``repo`` by a trusted key, or None (unsigned, forged, by
        an untrusted key).  Registry errors other than a missing signature propagate."""
        try:
            man = client.get_manifest(repo.in_repository(repo.repository).with_tag(signature_tag(digest)),
                                      accept=(MT_OCI_MANIFEST,))
        except NotFound:
            return None
        best: Verified | None = None
        for layer in (man.doc.get("layers") or [])[:MAX_SIGNATURES]:
            try:
                if layer.get("mediaType") != SIMPLESIGNING_MEDIA_TYPE or int(layer.get("size", 0)) > MAX_PAYLOAD_BYTES:
                    continue
                sig = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
                if not isinstance(sig, str):
                    continue
                payload = client.get_blob(repo.in_repository(repo.repository), str(layer["digest"]),
                                          max_size=MAX_PAYLOAD_BYTES)
            except NotFound:
                continue
            except (AttributeError, TypeError, ValueError, KeyError):
                continue
            v = self.check(digest, payload, sig)
            if v is not None and (best is None or v.signed_at > best.signed_at):
                best = v
        return best


# ------------------------------------------------------------------------------------------------ policy
@dataclass(frozen=True)
class Rule:
    scope: str  # "" (every image), "registry", or "registry/repository-prefix"
    mode: str
    verifier: Verifier | None

    def matches(self, name: str) -> bool:
        return not self.scope or name == self.scope or name.startswith(self.scope.rstrip("/") + "/")


@dataclass
class TrustPolicy:
    """Per registry/repository: ``require`` (only an index signed by a trusted key is used), ``prefer`` (a
    signed one over any unsigned one; unsigned if none is signed) or ``off`` (signatures ignored: the newest
    index is used).  The most specific matching rule wins; the snapshotter's ``[trust]`` table::

        [trust]
        mode = "require"
        keys = ["/etc/bootseer/index.pub"]
        [[trust.rules]]
        scope = "registry.internal:5000/scratch"
        mode = "prefer"                  # keys: the table's, unless the rule names its own
    """

    rules: list[Rule] = field(default_factory=list)
    fingerprint: str = ""  # names the policy (modes, scopes, keys): a disk cache from another policy is not used
    negative_ttl: float = 30.0  # an unsigned artifact is checked again after this (a signature may follow)
    _cache: OrderedDict[tuple[str, str], tuple[Verified | None, float]] = field(default_factory=OrderedDict,
                                                                               repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, default_mode: str = "require") -> TrustPolicy:
        d = dict(d or {})
        unknown = sorted(set(d) - {"mode", "keys", "rules"})
        if unknown:
            raise TrustError(f"[trust]: unknown keys {unknown}")
        mode = str(d.get("mode", default_mode))
        keys = [str(k) for k in d.get("keys") or []]
        top = Verifier.from_files(keys) if keys else None
        rules: list[Rule] = []
        for r in d.get("rules") or []:
            if not isinstance(r, dict) or set(r) - {"scope", "mode", "keys"} or "scope" not in r:
                raise TrustError(f"[[trust.rules]]: each rule needs scope and mode (and optional keys): {r!r}")
            rkeys = r.get("keys")
            rules.append(Rule(str(r["scope"]).rstrip("/"), str(r.get("mode", mode)),
                              Verifier.from_files(rkeys) if rkeys else top))
        rules.append(Rule("", mode, top))
        for rule in rules:
            if rule.mode not in MODES:
                raise TrustError(f"[trust]: mode must be one of {', '.join(MODES)}, not {rule.mode!r}")
        ident = json.dumps([[r.scope, r.mode, sorted(r.verifier.keys) if r.verifier else []] for r in rules])
        return cls(sorted(rules, key=lambda r: -len(r.scope)), fingerprint=sha256_digest(ident.encode()))

    @classmethod
    def for_signer(cls, signer: Signer) -> TrustPolicy:
        """``require`` with only the signer's own key (the converter: is this image signed by us already?)."""
        return cls([Rule("", "require", Verifier([signer.public_key]))], fingerprint=signer.key_id)

    @classmethod
    def off(cls) -> TrustPolicy:
        return cls([Rule("", "off", None)], fingerprint="off")

    def rule_for(self, name: str) -> Rule:
        """The rule for ``registry/repository`` (the most specific scope that matches)."""
        return next(r for r in self.rules if r.matches(name))

    def signature(self, client: RegistryClient, repo: Reference, digest: str) -> Verified | None:
        """The trusted signature of artifact ``digest`` (cached per digest and rule: a check is one manifest
        GET and a blob GET the first time, nothing after; a missing one is asked again after
        ``negative_ttl`` s)."""
        rule = self.rule_for(repo.name)
        if rule.verifier is None:
            return None
        key = (rule.scope, digest)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and (hit[0] is not None or hit[1] > now):
                self._cache.move_to_end(key)
                return hit[0]
        try:
            found = rule.verifier.verify_artifact(client, repo, digest)
        except RegistryError as e:  # not cached: the next lookup asks again
            log.warning("signature of %s in %s unreadable: %s", digest[:19], repo.name, e)
            return None
        with self._lock:
            self._cache[key] = (found, now + self.negative_ttl)
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return found
