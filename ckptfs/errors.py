"""Errors with a clear message for each way a checkpoint can be unusable.

Read errors are ``OSError`` with ``errno.EIO`` on purpose: the FUSE layer maps them to EIO unchanged, and
a Python caller that treats ckptfs like a file sees the same exception type a disk error would give.
"""

from __future__ import annotations

import errno


class CkptfsError(Exception):
    """Base of every ckptfs-specific error that is not an I/O error."""


class ManifestError(CkptfsError):
    """The manifest is missing fields, inconsistent or of an unknown format."""


class CheckpointNotFound(CkptfsError, FileNotFoundError):
    """No manifest at the URI: nothing was stored there, or a ``put`` has not finished."""


class CheckpointExists(CkptfsError):
    """``put`` refuses to replace a different, complete checkpoint."""


class CheckpointBusy(CkptfsError):
    """Another ``put`` to the same URI holds its lock: two writers must never interleave."""


class ChunkReadError(OSError):
    """A chunk could not be read even after retries (store unreachable, object missing or short)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class CorruptChunkError(ChunkReadError):
    """A chunk's bytes did not match its sha256 on every attempt: never serve them."""
