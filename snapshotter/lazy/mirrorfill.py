"""Pull-through mirrors that have not cached a blob yet: wait for them, never read their whole-blob answer.

A pull-through cache answers a range request for a blob it has not cached with the *whole* blob, ``200``.
docker-registry 2.8 in proxy mode (and what is built on it) does exactly this: the first request starts
copying the blob from the origin into its storage, and every request until that copy is committed — the
first one included — gets its own stream of the whole blob, fetched from the origin again from byte 0
(``registry/proxy/proxyblobstore.go``: ``copyContent`` for every request while the blob is in flight).  Once
the blob is stored, ranges are served from the mirror's disk.

Reading such an answer up to the range we wanted (what the fetcher does with a registry that ignores
``Range``) is correct — every chunk is verified — but ruinous behind a mirror: a read at offset 300 MB pulls
300 MB through the node's link, and the *origin* streams it again for each such request of each node, so a
fleet starting at once through a cold mirror costs the origin more than it would without the mirror.  Going
past the mirror to the origin while it fills costs the origin every node's reads: no better.  So:

* until a mirror has answered one range request of a blob, that request is the only one sent to it for the
  blob: the others wait for its answer (a node's prefetch workers and readers would otherwise each get, and
  each cost the origin, a whole-blob answer at once);
* a ``200`` to a range request from a mirror closes the response unread (the origin's copy for it stops
  after what the sockets buffered) and the mirror counts as *filling* that blob;
* reads of the blob wait for it — one probe at a time, at growing intervals with jitter (``probe`` doubling
  up to ``probe_max``), since every probe of a cold blob costs the origin a request and a few buffers' worth
  of bytes — and go on to the mirror as soon as it answers ``206``;
* a read whose deadline comes before the next probe goes past the mirror (a container's ``read(2)`` must not
  fail because a mirror is slow to fill), and so does every read once the mirror has filled for ``wait``
  seconds without serving a range of the blob (a mirror that never serves ranges).

State is per blob (one :class:`MirrorFills` per fetcher): a mirror fills blobs one by one.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Literal

from snapshotter.lazy.errors import FetchError

Route = Literal["try", "wait", "skip"]


class MirrorFilling(FetchError):
    """A mirror answered a range request with the whole blob (it has not cached the blob yet), or a read is
    waiting for it to; transient, never an outage: the mirror answered."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "mirror_filling")


@dataclass
class _Fill:
    since: float  # its first whole-blob answer
    next_probe: float  # no request goes to it before this
    interval: float  # the wait after the next probe


class MirrorFills:
    """Which mirrors of one blob are filling it, and when each may be asked again (see the module doc)."""

    ASK_POLL = 0.02  # how often a request held back by a first request in flight looks for its answer

    def __init__(self, mirrors: tuple[str, ...], *, wait: float, probe: float, probe_max: float) -> None:
        self.mirrors = frozenset(mirrors)
        self.wait, self.probe, self.probe_max = wait, probe, probe_max
        self._fills: dict[str, _Fill] = {}
        self._serves_ranges: set[str] = set()  # mirrors that answered a range request of this blob with 206
        self._asking: set[str] = set()  # mirrors whose first answer for this blob is awaited
        self._lock = threading.Lock()

    def unproven(self, base: str) -> bool:
        """Whether a ``200`` from ``base`` to a range request means "not cached yet": ``base`` is a mirror
        that has not served a range of this blob (one that has, answers a multi-range request with ``200``
        because it serves no multi-range requests)."""
        return base in self.mirrors and base not in self._serves_ranges

    def answered_whole(self, base: str, url: str) -> MirrorFilling:
        """``base`` answered a range request with the whole blob: it fills; the error to raise."""
        now = time.monotonic()
        with self._lock:
            self._asking.discard(base)
            fill = self._fills.get(base)
            if fill is None:
                self._fills[base] = _Fill(now, now + self._jitter(self.probe), min(2 * self.probe, self.probe_max))
        return MirrorFilling(f"GET {url}: the mirror answered a range request with the whole blob "
                             "(not cached there yet); waiting for it to fill")

    def served_range(self, base: str) -> None:
        """``base`` answered a range request of this blob with ``206``: it has the blob."""
        if base in self.mirrors:
            with self._lock:
                self._asking.discard(base)
                self._fills.pop(base, None)
                self._serves_ranges.add(base)

    def answered(self, base: str) -> None:
        """A request to ``base`` ended (whatever its outcome): it no longer holds the others back."""
        with self._lock:
            self._asking.discard(base)

    def route(self, base: str, until: float | None) -> Route:
        """What a request to ``base`` should do now: ``try`` it (a probe is due: it is claimed, so that the
        other readers keep waiting), ``wait`` for the next probe, or ``skip`` to the next endpoint (the read's
        deadline ``until`` comes first, or the mirror filled too long)."""
        with self._lock:
            fill = self._fills.get(base)
            now = time.monotonic()
            if fill is None:
                if base not in self.mirrors or base in self._serves_ranges:
                    return "try"
                if base in self._asking:  # its first answer is awaited: it tells whether the blob is there
                    return "skip" if until is not None and until < now + self.ASK_POLL else "wait"
                self._asking.add(base)
                return "try"
            if now - fill.since > self.wait:
                return "skip"
            if now >= fill.next_probe:
                fill.next_probe = now + self._jitter(fill.interval)
                fill.interval = min(2 * fill.interval, self.probe_max)
                return "try"
            return "skip" if until is not None and until < fill.next_probe else "wait"

    def filling(self) -> bool:
        """Whether a mirror is filling this blob (requests stay single-range: a ``206`` proves the fill done)."""
        now = time.monotonic()
        with self._lock:
            return any(now - f.since <= self.wait for f in self._fills.values())

    def next_probe_in(self) -> float:
        """Seconds until the earliest probe of a filling mirror is due, or until a first answer awaited may have
        come (0 when one is due, or nothing is awaited)."""
        now = time.monotonic()
        with self._lock:
            due = [f.next_probe for f in self._fills.values() if now - f.since <= self.wait]
            if self._asking:
                due.append(now + self.ASK_POLL)
        return max(0.0, min(due) - now) if due else 0.0

    def window_end(self) -> float:
        """When the last filling mirror is given up (``time.monotonic()``; now when none fills)."""
        with self._lock:
            ends = [f.since + self.wait for f in self._fills.values()]
        return max(ends) if ends else time.monotonic()

    @staticmethod
    def _jitter(seconds: float) -> float:
        return seconds * (0.75 + random.random() / 4)  # a fleet's nodes must not probe in step
