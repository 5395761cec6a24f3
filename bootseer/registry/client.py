"""The registry client the rest of BootSeer uses: every operation of :mod:`~bootseer.registry.manifests`,
:mod:`~bootseer.registry.blobs` and :mod:`~bootseer.registry.referrers` over one
:class:`~bootseer.registry.transport.Transport`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bootseer.registry.blobs import Blobs
from bootseer.registry.referrers import Referrers

log = logging.getLogger("bootseer.registry")

class RegistryClient(Referrers, Blobs):
    """One client per process is enough: it is thread-safe (a ``requests`` session per thread, shared auth).

    ``plain_http`` makes registries without a ``hosts.toml`` use ``http://`` (loopback hosts do anyway);
    ``insecure`` skips TLS verification for them.  ``credentials`` is a docker config path, a
    :class:`DockerConfig`, or ``{host: Credentials}``.
    """


def default_client(plain_http: bool = False, **kw: Any) -> RegistryClient:
    """A client configured from the environment: ``BOOTSEER_HOSTS_DIR`` (default containerd's certs.d)."""
    hosts_dir = os.environ.get("BOOTSEER_HOSTS_DIR") or "/etc/containerd/certs.d"
    return RegistryClient(hosts_dir=hosts_dir, plain_http=plain_http, **kw)
