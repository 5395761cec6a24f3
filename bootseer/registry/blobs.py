"""Blobs: whole downloads streamed, resumed with ``Range`` after a dropped connection and verified against their
digest (:class:`~bootseer.registry.errors.DigestMismatch` otherwise); range reads
(:meth:`Blobs.get_blob_range`) are left to the caller to verify, since only it knows the chunk digests.
Uploads: monolithic or chunked (``PATCH`` with ``Content-Range``), and cross-repository mounts, so a blob
converted once is linked, not re-sent.  An upload that fails half-way is restarted from scratch (a ``PATCH``
is not idempotent).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlencode, urljoin

import requests

from bootseer.hosts import Endpoint
from bootseer.reference import Reference
from bootseer.registry.errors import DigestMismatch, NotFound, RegistryError, TransientError
from bootseer.registry.oci import (
    Descriptor,
    _hasher,
    sha256_digest,
    verify_bytes,
)
from bootseer.registry.transport import Transport, as_reference

log = logging.getLogger("bootseer.registry")

class Blobs(Transport):
    def blob_exists(self, ref: Reference | str, digest: str) -> int | None:
        """The blob's size if the repository has it, else None."""
        ref = as_reference(ref)
        try:
            _, resp = self._request(ref, "HEAD", f"/{ref.repository}/blobs/{digest}", capability="pull")
        except NotFound:
            return None
        return int(resp.headers.get("Content-Length") or 0)

    def get_blob(self, ref: Reference | str, digest: str, max_size: int = 64 << 20) -> bytes:
        """A small blob (config, index) in memory, verified."""
        ref = as_reference(ref)
        _, data = self._get_small(ref, f"/{ref.repository}/blobs/{digest}", max_size, f"blob {digest}",
                                  capability="pull")
        verify_bytes(data, digest)
        return data

    def fetch_blob(self, ref: Reference | str, digest: str, dest: IO[bytes], size: int | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
        """Stream a blob into ``dest`` (a seekable binary file at position 0), resuming with ``Range`` after a
        dropped connection; verify size and digest.  Returns the byte count.  On :class:`DigestMismatch` the
        caller must discard ``dest``."""
        ref = as_reference(ref)
        h = _hasher(digest)
        written = 0
        attempt = 0
        while True:
            headers = {"Range": f"bytes={written}-"} if written else {}
            _, resp = self._request(ref, "GET", f"/{ref.repository}/blobs/{digest}", capability="pull",
                                    ok=(200, 206), headers=headers, stream=True)
            if written and resp.status_code == 200:  # the server ignored Range: start over
                dest.seek(0)
                dest.truncate()
                h, written = _hasher(digest), 0
            try:
                for chunk in resp.iter_content(1 << 20):
                    h.update(chunk)
                    dest.write(chunk)
                    written += len(chunk)
                    if progress:
                        progress(len(chunk))
                    if size is not None and written > size:
                        raise DigestMismatch(f"blob {digest}: more than the {size} bytes announced")
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                resp.close()
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest}: download failed after {attempt + 1} tries: {e}") from e
                log.info("blob %s: connection lost at %d bytes (%s); resuming", digest, written, e.__class__.__name__)
                self._sleep_backoff(attempt, what=f"blob {digest}: {e}", reason="cut")
                attempt += 1
                continue
            break
        if size is not None and written != size:
            raise DigestMismatch(f"blob {digest}: got {written} bytes, the manifest says {size}")
        got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
        if got != digest:
            raise DigestMismatch(f"blob {digest}: content hashes to {got}")
        return written

    def get_blob_range(self, ref: Reference | str, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (the caller verifies them against its chunk digests)."""
        ref = as_reference(ref)
        end = offset + length - 1
        attempt = 0
        while True:
            _, resp = self._request(ref, "GET", f"/{ref.repository}/blobs/{digest}", capability="pull",
                                    ok=(200, 206), headers={"Range": f"bytes={offset}-{end}"}, stream=True)
            try:
                if resp.status_code == 206:
                    data = bytes(resp.raw.read(length + 1, decode_content=True))
                else:  # no range support (some mirrors): skip to the range
                    buf = bytearray()
                    skipped = 0
                    for chunk in resp.iter_content(1 << 20):
                        if skipped + len(chunk) <= offset:
                            skipped += len(chunk)
                            continue
                        buf += chunk[max(0, offset - skipped):]
                        skipped = offset
                        if len(buf) >= length:
                            break
                    data = bytes(buf[:length])
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    OSError) as e:
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest} [{offset}, +{length}): {e}") from e
                self._sleep_backoff(attempt, what=f"blob {digest} [{offset}, +{length}): {e}", reason="cut")
                attempt += 1
                continue
            finally:
                resp.close()
            if len(data) != length:
                if attempt >= self.retries:
                    raise TransientError(f"blob {digest} [{offset}, +{length}): got {len(data)} bytes")
                self._sleep_backoff(attempt, what=f"blob {digest} [{offset}, +{length}): short", reason="cut")
                attempt += 1
                continue
            return data

    def mount_blob(self, ref: Reference | str, digest: str, from_repo: str) -> bool:
        """Link ``digest`` from ``from_repo`` into ``ref``'s repository without sending it; True if mounted."""
        ref = as_reference(ref)
        q = urlencode({"mount": digest, "from": from_repo})
        ep, resp = self._request(ref, "POST", f"/{ref.repository}/blobs/uploads/?{q}", capability="push",
                                 push=True, ok=(201, 202), extra_scopes=(f"repository:{from_repo}:pull",),
                                 headers={"Content-Length": "0"})
        if resp.status_code == 201:
            return True
        loc = resp.headers.get("Location")
        if loc:  # the registry opened an upload instead: cancel it, the caller decides what to do
            with contextlib.suppress(RegistryError):
                self._send(ep, "DELETE", urljoin(ep.base + "/", loc), scopes=(), ok=(200, 202, 204, 404),
                           retries=0)
        return False

    def push_blob(self, ref: Reference | str, source: bytes | Path | str, digest: str | None = None, *,
                  chunk_size: int | None = None, mount_from: Iterable[str] = (),
                  progress: Callable[[int], None] | None = None) -> Descriptor:
        """Upload a blob (bytes or a file) unless the repository has it; try ``mount_from`` repositories first.

        ``chunk_size`` None: one ``PUT``; otherwise ``PATCH`` chunks of that size, then the closing ``PUT``.
        """
        ref = as_reference(ref)
        if isinstance(source, (str, Path)):
            body: bytes | Path = Path(source)
            size = Path(source).stat().st_size
            digest = digest or _file_digest(Path(source))
        else:
            size, body = len(source), source
            digest = digest or sha256_digest(source)
        desc = Descriptor("application/octet-stream", digest, size)
        have = self.blob_exists(ref, digest)
        if have is not None:
            return desc
        for repo in mount_from:
            if repo != ref.repository and self.mount_blob(ref, digest, repo):
                log.debug("mounted %s from %s into %s", digest, repo, ref.repository)
                return desc
        attempt = 0
        while True:
            try:
                self._upload(ref, body, size, digest, chunk_size, progress)
                return desc
            except TransientError:
                if attempt >= self.retries:
                    raise
                log.info("upload of %s failed; restarting it", digest)
            except RegistryError as e:
                # Another pusher's upload of the same blob committed meanwhile: docker-registry 2.8 commits every
                # upload onto the blob's one path and may answer the loser DIGEST_INVALID (seen with two
                # `depsnap run` builders pushing the same base blobs).  The blob is there: done.  Not yet there:
                # the other commit is under way — look again, or upload again, after a pause.
                if e.code != "DIGEST_INVALID" or attempt >= self.retries:
                    raise
                log.info("upload of %s lost a race with another upload of it; looking again", digest)
            self._sleep_backoff(attempt)
            attempt += 1
            if self.blob_exists(ref, digest) is not None:  # (another upload of it may have committed)
                return desc

    def _upload(self, ref: Reference, source: bytes | Path, size: int, digest: str, chunk_size: int | None,
                progress: Callable[[int], None] | None) -> None:
        scopes = (f"repository:{ref.repository}:pull,push",)
        ep, resp = self._request(ref, "POST", f"/{ref.repository}/blobs/uploads/", capability="push", push=True,
                                 ok=(202,), headers={"Content-Length": "0"})
        loc = _location(ep, resp)

        def reader(start: int, n: int) -> Callable[[], bytes | IO[bytes] | Iterable[bytes]]:
            if isinstance(source, bytes):
                return lambda: source[start : start + n]
            return lambda: _file_slice(source, start, n, progress)

        if chunk_size is None or size <= chunk_size:
            if isinstance(source, bytes) and progress:
                progress(size)
            resp = self._send(ep, "PUT", _with_query(loc, digest=digest), scopes=scopes, ok=(201,), retries=0,
                              headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                              data=reader(0, size))
        else:
            for start in range(0, size, chunk_size):
                n = min(chunk_size, size - start)
                resp = self._send(ep, "PATCH", loc, scopes=scopes, ok=(202,), retries=0,
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                           "Content-Range": f"{start}-{start + n - 1}"},
                                  data=reader(start, n))
                loc = _location(ep, resp)
                if isinstance(source, bytes) and progress:
                    progress(n)
            resp = self._send(ep, "PUT", _with_query(loc, digest=digest), scopes=scopes, ok=(201,), retries=0,
                              headers={"Content-Length": "0"})
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise DigestMismatch(f"registry stored the upload as {got}, expected {digest}")


def _location(ep: Endpoint, resp: requests.Response) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise RegistryError(f"upload: HTTP {resp.status_code} without a Location header")
    return urljoin(ep.base + "/", loc)


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _FileSlice:
    """``n`` bytes of a file from ``start`` with a ``len()``, so ``requests`` sends Content-Length (not chunked
    transfer encoding, which distribution rejects on uploads) and streams it in 1 MiB pieces."""

    def __init__(self, path: Path, start: int, n: int, progress: Callable[[int], None] | None) -> None:
        self._path, self._start, self._n, self._progress = path, start, n, progress

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[bytes]:
        with open(self._path, "rb") as fh:
            fh.seek(self._start)
            left = self._n
            while left > 0:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    raise RegistryError(f"{self._path}: shorter than expected while uploading")
                left -= len(chunk)
                if self._progress:
                    self._progress(len(chunk))
                yield chunk


def _file_slice(path: Path, start: int, n: int, progress: Callable[[int], None] | None) -> IO[bytes]:
    return _FileSlice(path, start, n, progress)  # type: ignore[return-value]  # iterable body
