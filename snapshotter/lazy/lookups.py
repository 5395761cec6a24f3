"""Registry lookups on the Prepare path, run off containerd's gRPC workers and bounded per registry.

A remote ``Prepare`` asks the image's registry for the index (referrers, index manifest and blob, image
config) before it can answer.  That call runs in one of the gRPC server's worker threads, which every
snapshot call of every tenant on the node shares.  A registry that answers slowly on purpose (a tarpit:
one byte every few seconds keeps each socket read under its timeout) must cost only its own images'
Prepares, and each of them at most the lookup deadline:

* every lookup runs in a thread of its own; the Prepare waits for it at most ``timeout`` seconds and then
  takes the ordinary pull (the thread finishes, or hits its own deadline, in the background);
* at most ``per_registry`` lookups run against one registry at once.  A Prepare that finds its registry's
  slots taken by lookups still running does not queue behind them: it falls back at once.  So a tarpit holds
  at most that many threads, and no gRPC worker beyond the Prepares of its own images;
* lookups asking the same question (the same key) share one thread and one answer.

The lookup itself gets a deadline as well (``RegistryClient.deadline``, which also bounds reading a body),
so the slots a tarpit holds are given back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

log = logging.getLogger("bootseer.lazy.lookups")

T = TypeVar("T")


class LookupUnavailable(RuntimeError):
    """The lookup did not answer in time, or its registry has no free slot: take the ordinary pull."""


class Lookups:
    """Runs lookups in their own threads with a wait deadline and a per-registry cap (see the module)."""

    def __init__(self, timeout: float, per_registry: int) -> None:
        if timeout <= 0 or per_registry < 1:
            raise ValueError(f"lookup timeout {timeout} and concurrency {per_registry} must be positive")
        self.timeout = timeout
        self.per_registry = per_registry
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}  # registry → lookups in flight
        self._shared: dict[Hashable, concurrent.futures.Future[object]] = {}
        self.fell_back = 0  # Prepares that took the ordinary pull because of this gate (a counter for tests/logs)

    def in_flight(self, registry: str) -> int:
        with self._lock:
            return self._running.get(registry, 0)

    def run(self, registry: str, key: Hashable, fn: Callable[[], T]) -> T:
        """``fn()``'s result, computed in a thread of its own (shared with a running lookup of the same
        ``key``); raises :class:`LookupUnavailable` past ``timeout`` or when ``registry`` has no free slot,
        and ``fn``'s own exception if it failed."""
        key = (registry, key)
        with self._lock:
            fut = self._shared.get(key)
            if fut is None:
                if self._running.get(registry, 0) >= self.per_registry:
                    self.fell_back += 1
                    raise LookupUnavailable(f"{registry}: {self.per_registry} lookups still running there "
                                            "(a slow registry); not waiting for a slot")
                fut = concurrent.futures.Future()
                self._shared[key] = fut
                self._running[registry] = self._running.get(registry, 0) + 1
                threading.Thread(target=self._work, args=(registry, key, fut, fn), name=f"lookup {registry}",
                                 daemon=True).start()
        try:
            return fut.result(timeout=self.timeout)  # type: ignore[return-value]
        except concurrent.futures.TimeoutError:
            with self._lock:
                self.fell_back += 1
            raise LookupUnavailable(f"{registry}: no answer within {self.timeout:.0f} s") from None

    def _work(self, registry: str, key: Hashable, fut: concurrent.futures.Future[object],
              fn: Callable[[], object]) -> None:
        result: object = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as e:  # handed to every waiter; this thread has nobody else to tell
            error = e
        with self._lock:  # the slot is free before anyone sees the answer
            self._shared.pop(key, None)
            left = self._running.get(registry, 1) - 1
            if left:
                self._running[registry] = left
            else:
                self._running.pop(registry, None)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
