"""``integration.stack.wait_for``, which every stack test and benchmark waits with: a check that asserts the
wait can never succeed fails it at once, and a timeout says why the check kept failing."""

from __future__ import annotations

import pytest

from integration.stack import StackError, wait_for


def test_an_assertion_in_the_check_surfaces_at_once() -> None:
    calls = []

    def check() -> bool:
        calls.append(1)
        assert len(calls) < 3, "the conversion job failed"
        return False

    with pytest.raises(AssertionError, match="the conversion job failed"):
        wait_for("conversion", check, timeout=20)
    assert len(calls) == 3  # not polled again: the wait ended at the assertion, not at its timeout


def test_other_errors_mean_not_ready_and_the_last_one_is_reported() -> None:
    state = {"n": 0}

    def check() -> bool:
        state["n"] += 1
        if state["n"] < 4:
            raise ConnectionRefusedError("not listening yet")
        return True

    wait_for("server", check, timeout=600)
    assert state["n"] == 4

    def never() -> bool:
        raise ConnectionRefusedError("still not listening")

    with pytest.raises(StackError, match="ConnectionRefusedError: still not listening"):
        wait_for("server", never, timeout=0.05)
