"""ckptfs: checkpoints stored as striped, checksummed chunks, read back at the store's aggregate bandwidth.

``ckptfs.put`` writes a directory; ``ckptfs.open`` / ``ckptfs.read_file`` read it from Python;
``ckptfs.load_safetensors`` / ``ckptfs.torch_load`` load tensors (into GPU memory, streaming; see
:mod:`ckptfs.loader`); ``bootseer ckptfs mount`` shows it as a read-only filesystem (see :mod:`ckptfs.fusefs`).
"""

from ckptfs.api import CkptFile, open, read_file
from ckptfs.cache import DigestCache
from ckptfs.errors import (
    CheckpointBusy,
    CheckpointExists,
    CheckpointNotFound,
    ChunkReadError,
    CkptfsError,
    CorruptChunkError,
    ManifestError,
)
from ckptfs.loader import SafetensorsHeaderError, load_safetensors, torch_load
from ckptfs.put import put
from ckptfs.reader import Checkpoint, ReaderOptions
from ckptfs.store import StoreOptions, open_store

__all__ = [
    "Checkpoint",
    "CheckpointBusy",
    "CheckpointExists",
    "CheckpointNotFound",
    "ChunkReadError",
    "CkptFile",
    "CkptfsError",
    "CorruptChunkError",
    "DigestCache",
    "ManifestError",
    "ReaderOptions",
    "SafetensorsHeaderError",
    "StoreOptions",
    "load_safetensors",
    "open",
    "open_store",
    "put",
    "read_file",
    "torch_load",
]
