"""Errors of the snapshotter core.

They mirror containerd's ``errdefs`` classes because containerd decides what to do from the gRPC code alone
(``ALREADY_EXISTS`` from Prepare means "someone else unpacked this layer", ``NOT_FOUND`` from Stat means "go
and create it", ...).  The core raises these; only :mod:`snapshotter.service` turns them into gRPC statuses,
so the core stays usable (and testable) without grpc.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Base class; ``code`` names the gRPC status code it maps to."""

    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"
