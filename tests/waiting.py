"""Waiting for a condition in a test: polled against a deadline, never a guessed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
    """Poll ``condition()`` until it returns something true, and return that.

    The deadline is a hang guard, not a bound the test asserts: it should be
    far longer than the condition ever takes. Raises ``AssertionError``
    naming ``what`` when it passes.

    Example:
        >>> wait_until(lambda: 42, what="the answer")
        42
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.005)


def waiting_pulls(shard) -> int:
    """How many threads wait on ``shard`` for a version (``pull(wait_version=...)`` parked in it).

    Only a pull waits on the shard's condition, and a parked waiter is the one
    thing that tells a test the pull has got there before the test pushes: a
    push made before it would pass the test without waking anyone. The count
    is CPython's ``threading.Condition`` waiter list, read without the lock
    (one ``len``).
    """
    return len(shard._cond._waiters)
