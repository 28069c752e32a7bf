"""Compressors by name, and the spec strings of the command line.

Grammar (whitespace around tokens is ignored)::

    spec    := stage ("," stage)*           stages of a chain, first to last
    stage   := name | name ":" value | name ":" options
    options := key "=" value (";" key "=" value)*

``name:value`` sets a compressor's first option (``topk:0.01`` is
``topk:ratio=0.01``). Examples: ``none``, ``fp16``, ``topk:0.01``,
``topk:ratio=0.01,fp16``, ``threshold:tau=2,entropy``, ``onebit:chunk=1024``,
``topk:0.001,fp16,entropy:level=9``.

:func:`parse` wraps a spec that contains ``topk`` or ``onebit`` (biased per
step) in :func:`error_feedback`, around the whole chain so the feedback also
covers later stages' rounding; ``feedback=False`` turns that off.
``threshold`` keeps its own residual and is never wrapped.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from types import MappingProxyType

from downpour.compress.base import Transform, chain, error_feedback
from downpour.compress.coding import entropy
from downpour.compress.payloads import Dense
from downpour.compress.quantize import fp16, none, onebit
from downpour.compress.sparsify import threshold, topk
from downpour.errors import choose

COMPRESSORS: Mapping[str, Callable[..., Transform]] = MappingProxyType(
    {
        "none": none,
        "fp16": fp16,
        "topk": topk,
        "threshold": threshold,
        "onebit": onebit,
        "entropy": entropy,
    }
)
"""Every compressor (or stage) :func:`parse` knows, by name."""

FEEDBACK_BY_DEFAULT = frozenset({"topk", "onebit"})
"""Names whose presence makes :func:`parse` add error feedback."""


def _options(name: str) -> dict[str, type]:
    factory = COMPRESSORS[name]
    hints = typing.get_type_hints(factory)
    return {option: hints[option] for option in inspect.signature(factory).parameters}


def _convert(name: str, option: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} {option} must be {what}, got {text!r}") from None


def parse_stage(text: str) -> Transform:
    """One stage of a spec: ``name``, ``name:value`` or ``name:key=value;key=value``."""
    name, _, arguments = (part.strip() for part in text.partition(":"))
    if not name:
        raise ValueError(f"empty compressor stage in {text!r}; write e.g. topk:0.01 or fp16")
    choose("compressor", name, COMPRESSORS)
    options = _options(name)
    given: dict[str, str] = {}
    if arguments and "=" not in arguments:
        if not options:
            raise ValueError(f"{name} takes no options, got {arguments!r}")
        given[next(iter(options))] = arguments
    elif arguments:
        for item in arguments.split(";"):
            key, equals, value = (part.strip() for part in item.partition("="))
            if not equals or not value:
                raise ValueError(f"{name} option {item.strip()!r} is not key=value")
            choose(f"{name} option", key, options)
            if key in given:
                raise ValueError(f"{name} option {key!r} is given twice")
            given[key] = value
    return COMPRESSORS[name](
        **{key: _convert(name, key, value, options[key]) for key, value in given.items()}
    )


def parse(spec: str, *, feedback: bool = True) -> Transform:
    """The compressor a spec names (grammar in the module docstring).

    Args:
        spec: e.g. ``"topk:0.01,fp16"``.
        feedback: wrap specs with ``topk`` or ``onebit`` in :func:`error_feedback`.

    Raises:
        ValueError: naming the bad name, option or value and what is allowed.

    Example:
        >>> parse("topk:ratio=0.01,fp16").name
        'error_feedback(topk:ratio=0.01,fp16)'
        >>> parse("threshold:tau=2,entropy").name
        'threshold:tau=2.0,entropy:level=6'
    """
    texts = spec.split(",")
    stages = [parse_stage(text) for text in texts]
    compressor = stages[0] if len(stages) == 1 else chain(*stages)
    if Dense not in compressor.kinds:
        first = stages[0]
        raise ValueError(
            f"compressor spec {spec!r} cannot start with {first.name}: it takes "
            f"{', '.join(kind.__name__ for kind in first.kinds)} payloads of an earlier stage, "
            "not the vector; put it after topk or threshold"
        )
    names = {text.partition(":")[0].strip() for text in texts}
    if feedback and names & FEEDBACK_BY_DEFAULT and not compressor.feedback:
        compressor = error_feedback(compressor)
    return compressor
