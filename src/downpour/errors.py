"""One exception hierarchy for downpour.

User mistakes (a bad name, an out-of-range number) raise ``ValueError`` or
``TypeError`` with a message that states the bad value and what is allowed.
Failures of the distributed system raise a :class:`DownpourError` subclass.
"""

from __future__ import annotations


class DownpourError(Exception):
    """Base class of every error the distributed system raises."""


class DataError(DownpourError, ValueError):
    """A dataset file is missing, corrupt or malformed."""


class TransportError(DownpourError):
    """A remote call failed or a message was refused."""


class PeerTimeout(TransportError):
    """A peer did not answer within its deadline."""

    def __init__(self, peer: str, seconds: float, what: str = "answer") -> None:
        super().__init__(f"peer {peer} did not {what} within {seconds:g} s")
        self.peer = peer
        self.seconds = seconds


class PeerUnavailable(TransportError):
    """A peer cannot be reached (its process died, or its host is gone); a restarted one may come back."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class StaleUpdate(DownpourError):
    """An update was computed on parameters too old to be applied."""


class WorkerFailed(DownpourError):
    """A role died or raised; carries its rank, host and remote traceback."""

    def __init__(self, role: str, rank: int, host: str, reason: str, traceback: str = "") -> None:
        message = f"{role} {rank} on {host} failed: {reason}"
        if traceback:
            message += f"\n--- remote traceback ({role} {rank}) ---\n{traceback.rstrip()}"
        super().__init__(message)
        self.role = role
        self.rank = rank
        self.host = host
        self.reason = reason
        self.remote_traceback = traceback


class UnguardedMain(DownpourError, RuntimeError):
    """A script started a local run at import time, outside ``if __name__ == "__main__":``.

    Every local role process starts by importing the main module (that is how
    multiprocessing's ``forkserver`` and ``spawn`` find what a role was pickled
    with), so a script that trains at module level would start the run again in
    each of its roles.

    Example:
        >>> str(UnguardedMain("/home/me/train.py")).splitlines()[0]
        'the script /home/me/train.py must guard its entry point with if __name__ == "__main__":'
    """

    def __init__(self, path: str) -> None:
        super().__init__(
            f'the script {path} must guard its entry point with if __name__ == "__main__":\n'
            "every role process of a local run starts by importing the main module (the "
            "'forkserver' and 'spawn' start methods of multiprocessing re-import it), so a run "
            "started at module level starts again in each role. Put the call under the guard:\n\n"
            '    if __name__ == "__main__":\n'
            "        dp.train(...)")
        self.path = path


def choose(kind: str, name: str, choices) -> str:
    """Return ``name`` if it is one of ``choices``, else raise a helpful ValueError.

    Example:
        >>> choose("strategy", "single", ["single", "downpour"])
        'single'
    """
    options = sorted(choices)
    if name not in options:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(options)}")
    return name


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
    """Raise ValueError naming ``name`` if ``value`` lies outside [low, high]."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {value!r}")
