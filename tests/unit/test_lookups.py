"""The Prepare path's registry lookups (issue 18 item 4, tarpits): a slow registry holds at most its own slots,
a waiting Prepare gives up at its deadline, and a registry dripping its answer byte by byte cannot keep a
lookup past that deadline.  No root, no kernel: threads, events and a real HTTP server."""

from __future__ import annotations

import hashlib
import threading

import pytest

from bootseer.registry import RegistryClient, TransientError
from integration.faultproxy import FaultProxy
from snapshotter.lazy.lookups import Lookups, LookupUnavailable


def _blocked(started: threading.Semaphore, gate: threading.Event, value: str = "late") -> str:
    started.release()
    gate.wait(60)
    return value


def test_a_slow_registry_holds_only_its_own_slots() -> None:
    lookups = Lookups(timeout=30, per_registry=2)
    gate, started = threading.Event(), threading.Semaphore(0)
    waiters = [threading.Thread(target=lambda k=k: _ignore(lookups.run("tarpit.example", ("img", k),
                                                                         lambda: _blocked(started, gate))))
               for k in range(2)]
    for t in waiters:
        t.start()
    try:
        for _ in waiters:
            assert started.acquire(timeout=10)
        assert lookups.in_flight("tarpit.example") == 2
        # a third image of the same registry does not queue behind the stuck lookups: it falls back at once
        with pytest.raises(LookupUnavailable, match="lookups still running"):
            lookups.run("tarpit.example", ("img", 2), lambda: "never run")
        # another registry is not affected
        assert lookups.run("healthy.example", ("img", 0), lambda: "index") == "index"
    finally:
        gate.set()
        for t in waiters:
            t.join(10)
    assert lookups.in_flight("tarpit.example") == 0  # the slots come back when the lookups end
    assert lookups.run("tarpit.example", ("img", 3), lambda: "again") == "again"


def _ignore(fn: object) -> None:
    return None


def test_a_waiting_prepare_gives_up_at_its_deadline_and_the_same_question_is_asked_once() -> None:
    lookups = Lookups(timeout=0.2, per_registry=4)
    gate, started = threading.Event(), threading.Semaphore(0)
    calls = []

    def look() -> str:
        calls.append(1)
        return _blocked(started, gate, "index")

    try:
        with pytest.raises(LookupUnavailable, match="no answer within"):
            lookups.run("r.example", "key", look)
        with pytest.raises(LookupUnavailable):  # joins the running lookup: no second request
            lookups.run("r.example", "key", look)
        assert len(calls) == 1 and lookups.fell_back == 2
    finally:
        gate.set()


def test_a_lookups_error_reaches_the_prepare() -> None:
    lookups = Lookups(timeout=10, per_registry=1)

    def broken() -> str:
        raise ValueError("bad index")

    with pytest.raises(ValueError, match="bad index"):
        lookups.run("r.example", "k", broken)
    assert lookups.in_flight("r.example") == 0


def test_a_dripping_registry_cannot_hold_a_call_past_its_deadline() -> None:
    """The body arrives one byte every 0.2 s, so no socket read ever times out; without the deadline being
    checked while the body is read, this call returns the blob after ~40 s instead of failing at 1 s."""
    blob = b"x" * 200
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with FaultProxy(origin={digest: blob}) as proxy:
        proxy.add("drip", method="GET", path="/blobs/", delay=0.2, times=100)
        client = RegistryClient(plain_http=True, retries=0, read_timeout=30.0)
        with client.deadline(1.0), pytest.raises(TransientError, match="deadline"):
            client.get_blob(f"{proxy.address}/tarpit/img", digest)
