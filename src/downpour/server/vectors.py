"""Vector arithmetic on a shard's named vectors: what Sandblaster's coordinator sends.

DistBelief's Sandblaster keeps every vector of a batch optimizer (the
parameters, the batch gradient, L-BFGS's history, the search direction) on
the parameter-server shards. The coordinator drives the method with small
commands (dot products, ``axpy``, scale, copy) and receives only scalars, so
no full-length vector passes through it, whatever the model's size.

An op is a tuple: ``("zero", dst)``, ``("copy", dst, a)``, ``("scale", dst,
alpha)``, ``("axpy", dst, alpha, a)`` (``dst += alpha * a``), ``("dot", a,
b)`` and ``("drop", dst)``. A batch of ops is checked whole before any of it
runs, so a bad batch changes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from downpour.transport.protocol import InvalidUpdate

Op = tuple[Any, ...]

#: The parameters: writing them starts a new version (and a new gradient pass).
PARAMS = "x"
#: The batch gradient the workers' pushes are summed into.
GRADIENT = "g"
MAX_OPS = 1024
MAX_VECTORS = 64  # made by the coordinator, besides "x" and "g": bounds a shard's memory
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_ARITY = {"zero": 1, "copy": 2, "scale": 2, "axpy": 3, "dot": 2, "drop": 1}
CODES = tuple(_ARITY)


def zero(dst: str) -> Op:
    return ("zero", dst)


def copy(dst: str, a: str) -> Op:
    return ("copy", dst, a)


def scale(dst: str, alpha: float) -> Op:
    return ("scale", dst, float(alpha))


def axpy(dst: str, alpha: float, a: str) -> Op:
    return ("axpy", dst, float(alpha), a)


def dot(a: str, b: str) -> Op:
    return ("dot", a, b)


def drop(dst: str) -> Op:
    return ("drop", dst)


def _refuse(message: str) -> InvalidUpdate:
    return InvalidUpdate("BAD_REQUEST", message)


def check_ops(ops: Sequence[Op], existing: set[str]) -> bool:
    """Check a batch against the vectors in ``existing``; True if it writes the parameters.

    Raises:
        InvalidUpdate: an unknown op, a bad name, a vector read before it
            exists, an ``alpha`` that is not finite in float32, too many ops
            or vectors.
    """
    if len(ops) > MAX_OPS:
        raise _refuse(f"a call may carry at most {MAX_OPS} vector ops, got {len(ops)}")
    names = set(existing)
    writes_params = False
    for i, op in enumerate(ops):
        if not op or op[0] not in _ARITY or len(op) != 1 + _ARITY[op[0]]:
            raise _refuse(f"op {i} ({op!r}) is not one of: {', '.join(CODES)} with its operands")
        code, *args = op
        vectors = [a for a in args if not isinstance(a, float)]
        for name in vectors:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise _refuse(f"op {i} ({code}): vector name {name!r} is not 1-32 of [a-z0-9_] "
                              "starting with a letter")
        for alpha in (a for a in args if isinstance(a, float)):
            if not math.isfinite(alpha):
                raise InvalidUpdate("NON_FINITE", f"op {i} ({code}): alpha is {alpha}")
            if abs(alpha) > _FLOAT32_MAX:  # infinite in the vectors' float32
                raise InvalidUpdate(
                    "NON_FINITE", f"op {i} ({code}): alpha {alpha} is beyond float32's range"
                )
        dst, reads = (None, vectors) if code == "dot" else (vectors[0], vectors[1:])
        if code in ("scale", "axpy"):
            reads = vectors  # they read dst too
        for name in reads:
            if name not in names:
                raise _refuse(f"op {i} ({code}): this shard has no vector named {name!r}")
        if code == "drop":
            if dst in (PARAMS, GRADIENT):
                raise _refuse(f"op {i}: {dst!r} cannot be dropped")
            if dst not in names:
                raise _refuse(f"op {i} (drop): this shard has no vector named {dst!r}")
            names.discard(dst)
        elif dst is not None:
            names.add(dst)
            writes_params |= dst == PARAMS
    if len(names - {PARAMS, GRADIENT}) > MAX_VECTORS:
        raise _refuse(f"a shard keeps at most {MAX_VECTORS} vectors besides x and g; "
                      f"this call would leave {len(names) - 2}")
    return writes_params


def run_ops(ops: Sequence[Op], vectors: dict[str, torch.Tensor], size: int,
            lookup: Callable[[str], torch.Tensor]) -> list[float]:
    """Run a checked batch; ``vectors`` holds the coordinator's, ``lookup`` finds every vector.

    Dot products accumulate in float64, so a sum over millions of entries
    keeps the digits a line search needs.
    """
    values: list[float] = []
    for code, *args in ops:
        if code == "dot":
            a, b = lookup(args[0]), lookup(args[1])
            values.append(float(torch.dot(a.double(), b.double())) if a is not b
                          else float(a.double().square().sum()))
        elif code == "drop":
            del vectors[args[0]]
        elif code == "scale":
            lookup(args[0]).mul_(args[1])
        elif code == "axpy":
            lookup(args[0]).add_(lookup(args[2]), alpha=args[1])
        else:  # zero, copy: make the vector if absent
            dst = args[0]
            try:
                target = lookup(dst)
            except KeyError:
                target = vectors[dst] = torch.empty(size, dtype=torch.float32)
            if code == "zero":
                target.zero_()
            else:
                target.copy_(lookup(args[1]))
    return values
