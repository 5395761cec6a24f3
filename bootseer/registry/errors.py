"""What a registry call can fail with: one hierarchy, so callers catch :class:`RegistryError` and
look at ``status`` / ``code`` (the OCI error code) when the answer matters.
"""

from __future__ import annotations

import logging

from bootseer.log import redact

log = logging.getLogger("bootseer.registry")

class RegistryError(RuntimeError):
    """A registry request failed for good; ``status`` and ``code`` (the registry's error code) when known."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(redact(message))
        self.status, self.code = status, code


class NotFound(RegistryError):
    pass


class Unauthorized(RegistryError):
    pass


class DigestMismatch(RegistryError):
    """Downloaded bytes do not hash to the digest they were asked for (or the size is wrong)."""


class TransientError(RegistryError):
    """Retries exhausted on 5xx / timeouts / resets: worth trying again later."""
