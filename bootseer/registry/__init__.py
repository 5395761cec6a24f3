"""OCI distribution client on ``requests``: what the converter, the sidecar, the snapshotter's fetcher, the
recorder and depsnap need from a registry, and nothing that ties them to one registry product.

The package follows the data flow, one reason to change per module:

* :mod:`~bootseer.registry.oci` — the formats (media types, descriptors, manifests, digests, platforms);
* :mod:`~bootseer.registry.errors` — what a call fails with;
* :mod:`~bootseer.registry.transport` — how a request is made: endpoints and mirrors from ``hosts.toml``, auth,
  retries and backoff, deadlines, bounded bodies;
* :mod:`~bootseer.registry.manifests`, :mod:`~bootseer.registry.blobs`, :mod:`~bootseer.registry.referrers` —
  the operations on each kind of object;
* :mod:`~bootseer.registry.client` — :class:`RegistryClient`, all of them over one transport.

The names below are the package's API: import them from ``bootseer.registry``.
"""

from bootseer.registry.client import RegistryClient, default_client
from bootseer.registry.errors import DigestMismatch, NotFound, RegistryError, TransientError, Unauthorized
from bootseer.registry.oci import (
    EMPTY_DIGEST,
    EMPTY_JSON,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    MT_DOCKER_CONFIG,
    MT_DOCKER_FOREIGN_LAYER,
    MT_DOCKER_LAYER,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_CONFIG,
    MT_OCI_EMPTY,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    referrers_tag,
    select_platform,
    sha256_digest,
    verify_bytes,
)
from bootseer.registry.transport import RETRY_STATUS

__all__ = [
    "EMPTY_DIGEST", "EMPTY_JSON", "IMAGE_MANIFEST_TYPES", "INDEX_TYPES", "MANIFEST_TYPES", "MAX_MANIFEST_BYTES",
    "MT_DOCKER_CONFIG", "MT_DOCKER_FOREIGN_LAYER", "MT_DOCKER_LAYER", "MT_DOCKER_LIST", "MT_DOCKER_MANIFEST",
    "MT_OCI_CONFIG", "MT_OCI_EMPTY", "MT_OCI_INDEX", "MT_OCI_LAYER", "MT_OCI_LAYER_GZIP", "MT_OCI_LAYER_ZSTD",
    "MT_OCI_MANIFEST", "RETRY_STATUS", "Descriptor", "DigestMismatch", "Manifest", "NotFound", "Platform",
    "RegistryClient", "RegistryError", "TransientError", "Unauthorized", "default_client", "referrers_tag",
    "select_platform", "sha256_digest", "verify_bytes",
]
