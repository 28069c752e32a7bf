"""Compressors as optax-style transforms, their composition and error feedback.

A compressor is a pair of pure functions over the flat float32 vector,
``init(x) -> state`` and ``encode(x, state) -> (payload, state)``, and a
``decode(payload) -> tensor`` that needs no state (a payload describes
itself, so a receiver decodes without knowing the sender's recipe). Stages
compose with :func:`chain`: the first takes the vector, each later one takes
the payload of the one before (``chain(topk(0.01), fp16())`` keeps 1% of the
entries, then halves their values). :func:`error_feedback` is the one wrapper
that carries what a compressor did not send into the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch

from downpour.compress.payloads import Dense, Payload, decode


class Compressor(Protocol):
    """What strategies and the registry expect of a compressor.

    ``kinds`` maps each payload type a compressor takes to the type it makes
    (a tensor counts as :class:`Dense`); :func:`chain` checks the stages fit
    when it is built. ``feedback`` is true when the compressor keeps a
    residual of what it did not send (so no second error feedback on top).
    ``encode`` never returns a payload sharing memory with its input or state.
    """

    name: str
    kinds: Mapping[type, type]
    feedback: bool

    def init(self, x: torch.Tensor) -> Any: ...

    def encode(self, x: torch.Tensor | Payload, state: Any) -> tuple[Payload, Any]: ...

    def decode(self, payload: Payload) -> torch.Tensor: ...


class Transform(NamedTuple):
    """A compressor made of plain functions: what every factory here returns."""

    name: str
    init: Callable[[torch.Tensor], Any]
    encode: Callable[[Any, Any], tuple[Payload, Any]]
    kinds: Mapping[type, type]
    feedback: bool = False
    decode: Callable[[Payload], torch.Tensor] = decode

    def __repr__(self) -> str:
        return f"Transform({self.name!r})"


class EmptyState(NamedTuple):
    """The state of a compressor that keeps none."""


class ErrorFeedbackState(NamedTuple):
    residual: torch.Tensor  # float32: what was meant to be sent and was not, summed
    inner: Any


def as_payload(x: torch.Tensor | Payload) -> Payload:
    """A flat float32 vector as a :class:`Dense` payload (sharing its memory); payloads pass."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(
            f"compressors take a flat 1-D float32 vector, got shape {tuple(x.shape)} of {x.dtype}; "
            "flatten it (downpour.flat.flatten) and convert it with .float()"
        )
    return Dense(x.detach())


def _names(kinds) -> str:
    return ", ".join(kind.__name__ for kind in kinds) or "nothing"


def stage(name: str, kinds: Mapping[type, type], transform: Callable[[Any], Payload]) -> Transform:
    """A stateless compressor that applies ``transform`` to a payload of one of ``kinds``."""

    def encode(x, state):
        payload = as_payload(x)
        if type(payload) not in kinds:
            raise TypeError(
                f"{name} cannot take a {type(payload).__name__} payload; it takes {_names(kinds)}"
            )
        return transform(payload), state

    return Transform(name, lambda x: EmptyState(), encode, dict(kinds))


def chain(*stages: Compressor) -> Transform:
    """The stages one after the other: each encodes the payload of the one before.

    Raises ValueError at once if a stage cannot take what the one before makes.

    Example:
        >>> from downpour.compress import fp16, topk
        >>> c = chain(topk(0.5), fp16())
        >>> payload, _ = c.encode(torch.tensor([1.0, -3.0]), c.init(torch.zeros(2)))
        >>> payload.values
        tensor([-3.], dtype=torch.float16)
    """
    if not stages:
        raise ValueError("chain needs at least one compressor")
    kinds = dict(stages[0].kinds)
    for number, later in enumerate(stages[1:], start=2):
        made = dict.fromkeys(kinds.values())
        kinds = {taken: later.kinds[out] for taken, out in kinds.items() if out in later.kinds}
        if not kinds:
            raise ValueError(
                f"chain stage {number} ({later.name}) cannot take what the stages before make "
                f"({_names(made)}); it takes {_names(later.kinds)}"
            )

    def init(x):
        return tuple(compressor.init(x) for compressor in stages)

    def encode(x, state):
        states = []
        for compressor, inner in zip(stages, state, strict=True):
            x, inner = compressor.encode(x, inner)
            states.append(inner)
        return x, tuple(states)

    name = ",".join(compressor.name for compressor in stages)
    return Transform(name, init, encode, kinds, any(s.feedback for s in stages))


def error_feedback(inner: Compressor) -> Transform:
    """Send ``encode(residual + x)`` and keep what it missed in the residual.

    Biased compressors (top-k drops entries, one-bit quantization rounds each
    to one of two values) lose a little of the update every step; summed over
    steps that loss stops training. Carrying it into the next step makes the
    sum of what was sent track the sum of the inputs: after any number of
    steps, sent + residual == inputs (Seide et al. 2014; Stich et al. 2018).

    Example:
        >>> from downpour.compress import topk
        >>> c = error_feedback(topk(0.5))
        >>> x = torch.tensor([1.0, -3.0])
        >>> payload, state = c.encode(x, c.init(x))
        >>> state.residual
        tensor([1., 0.])
    """
    if inner.feedback:
        raise ValueError(
            f"{inner.name} already keeps a residual of what it does not send; "
            "error_feedback on top would count that part twice"
        )
    if Dense not in inner.kinds:
        raise ValueError(
            f"error_feedback needs a compressor that takes the vector; {inner.name} takes "
            f"{_names(inner.kinds)}"
        )

    def init(x):
        return ErrorFeedbackState(torch.zeros_like(x, dtype=torch.float32), inner.init(x))

    def encode(x, state):
        dense = as_payload(x)
        if not isinstance(dense, Dense):
            raise TypeError(
                f"error_feedback takes the vector, got a {type(dense).__name__} payload"
            )
        residual = state.residual + dense.values
        payload, inner_state = inner.encode(residual, state.inner)
        payload.add_to_(residual, alpha=-1.0)  # ours: a new tensor, never aliased by the payload
        return payload, ErrorFeedbackState(residual, inner_state)

    kinds = {Dense: inner.kinds[Dense]}
    return Transform(f"error_feedback({inner.name})", init, encode, kinds, feedback=True)


def residual_of(state: Any) -> torch.Tensor | None:
    """The residual a compressor's state carries (error feedback, threshold), or None."""
    residual = getattr(state, "residual", None)
    if isinstance(residual, torch.Tensor):
        return residual
    if isinstance(state, tuple):
        for inner in state:
            found = residual_of(inner)
            if found is not None:
                return found
    return None


class Stream:
    """A compressor and its state: what a sender keeps for one receiver (a shard, a peer).

    Counts the raw and encoded bytes of what it sent, for the run's metrics.

    Example:
        >>> from downpour.compress import parse
        >>> stream = Stream(parse("threshold:tau=1"))
        >>> stream.encode(torch.tensor([0.5, 1.5])).to_dense()
        tensor([0., 1.])
        >>> stream.encode(torch.tensor([0.5, 0.0])).to_dense()  # the residual 0.5 + 0.5 crosses tau
        tensor([1., 0.])
        >>> stream.raw_bytes, stream.messages
        (16, 2)
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.state: Any = None
        self.raw_bytes = self.encoded_bytes = self.messages = 0

    def encode(self, x: torch.Tensor) -> Payload:
        """The payload to send for ``x`` (a 1-D float32 vector on the host)."""
        if self.state is None:
            self.state = self.compressor.init(x)
        payload, self.state = self.compressor.encode(x, self.state)
        self.raw_bytes += payload.raw_nbytes
        self.encoded_bytes += payload.nbytes
        self.messages += 1
        return payload


def compression_counters(streams) -> dict[str, int]:
    """A role's cumulative ``comm/*`` counters of its compressed messages (``compress.Stream``)."""
    return {"comm/raw_bytes": sum(s.raw_bytes for s in streams),
            "comm/encoded_bytes": sum(s.encoded_bytes for s in streams),
            "comm/compressed_messages": sum(s.messages for s in streams)}
