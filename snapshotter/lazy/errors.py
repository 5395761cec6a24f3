"""Why a chunk fetch failed, and whether asking again can help.

Every failure a reader can see is a :class:`FetchError`, an ``OSError`` with ``EIO`` (what ``read(2)`` returns
through FUSE or the loop device), carrying a ``reason`` for metrics and whether it is *transient*: overload and
gateway answers (408, 429, 5xx but 501/505), resets, timeouts and bodies cut short are worth retrying; any other
4xx, a malformed answer and an invalid URL are not.  The fetcher's retry loop (:mod:`snapshotter.lazy.fetcher`)
and the endpoint health in :mod:`snapshotter.lazy.transport` both decide by these classes.
"""

from __future__ import annotations

import email.utils
import errno
import time

import requests


class FetchError(OSError):
    """A chunk could not be fetched and verified in time.  Always EIO: that is what the reader sees.

    ``reason`` names the failure for metrics (``http_503``, ``reset``, ``timeout``, ``cut``, ``corrupt``, …);
    ``transient``: worth retrying (see the module doc); ``retry_after``: seconds the endpoint asked us to
    wait (``Retry-After``)."""

    def __init__(self, message: str, reason: str = "other", *, transient: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(errno.EIO, message)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class Cancelled(FetchError):
    """The fetch was abandoned because its layer is going away (background fill, prefetch)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "cancelled", transient=False)


class CorruptChunk(FetchError):
    """Bytes arrived but failed sha256 verification (the registry is reachable; the data is wrong)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "corrupt")


def transient_status(status: int) -> bool:
    """A status worth asking again for: overload and gateway errors, not a request that is wrong."""
    return status in (408, 429) or (status >= 500 and status not in (501, 505))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from now that a ``Retry-After`` header (delta-seconds or an HTTP date) asks for, capped at an
    hour; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(3600.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(3600.0, max(0.0, when.timestamp() - (time.time() if now is None else now)))


def status_error(url: str, what: str, resp: requests.Response) -> FetchError:
    """The :class:`FetchError` for an unexpected HTTP status."""
    code = resp.status_code
    after = retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
    return FetchError(f"GET {url} {what}: HTTP {code}" + (f" (Retry-After {after:.0f}s)" if after else ""),
                      f"http_{code}", transient=transient_status(code), retry_after=after)


def transport_error(url: str, what: str, e: requests.RequestException) -> FetchError:
    """The :class:`FetchError` for an exception of ``requests`` (connecting, sending or reading a body)."""
    text = str(e)
    if isinstance(e, requests.Timeout) or "timed out" in text.lower():
        reason = "timeout"
    elif isinstance(e, requests.exceptions.ChunkedEncodingError):
        reason = "cut"  # the connection ended inside the body
    elif isinstance(e, requests.ConnectionError):
        reason = "reset"
    else:  # an invalid URL, too many redirects, …: asking again gives the same answer
        return FetchError(f"GET {url} {what}: {type(e).__name__}: {text}", "other", transient=False)
    return FetchError(f"GET {url} {what}: {type(e).__name__}: {text}", reason)
