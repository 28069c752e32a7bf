"""Gradient compression: small stateful transforms over the flat vector.

A compressor is optax-style: ``init(x) -> state``, ``encode(x, state) ->
(payload, state)`` and ``decode(payload) -> tensor``, over a 1-D float32
vector. Stages compose with :func:`chain`; :func:`error_feedback` carries
what a biased compressor did not send into the next step. A payload
(:class:`Dense`, :class:`Sparse`, :class:`Signs`, :class:`OneBit`) is a typed
value that knows its exact wire size (``nbytes``) and decodes itself; only
:mod:`downpour.transport.payload` turns it into bytes. :func:`parse` reads
the command line's specs (``"topk:0.01,fp16"``; grammar in
:mod:`downpour.compress.registry`).

Example:
    >>> import torch
    >>> from downpour import compress
    >>> c = compress.parse("topk:0.25")  # with error feedback
    >>> x = torch.tensor([0.5, -3.0, 0.25, 0.0])
    >>> payload, state = c.encode(x, c.init(x))
    >>> c.decode(payload)
    tensor([ 0., -3.,  0.,  0.])
    >>> compress.residual_of(state)
    tensor([0.5000, 0.0000, 0.2500, 0.0000])
    >>> payload.nbytes, payload.raw_nbytes
    (22, 16)
"""

from downpour.compress.base import Compressor
from downpour.compress.base import EmptyState
from downpour.compress.base import ErrorFeedbackState
from downpour.compress.base import Stream
from downpour.compress.base import Transform
from downpour.compress.base import chain
from downpour.compress.base import compression_counters
from downpour.compress.base import error_feedback
from downpour.compress.base import residual_of
from downpour.compress.coding import code_indices
from downpour.compress.coding import decode_indices
from downpour.compress.coding import entropy
from downpour.compress.payloads import PAYLOADS
from downpour.compress.payloads import CodedIndices
from downpour.compress.payloads import Dense
from downpour.compress.payloads import MalformedPayload
from downpour.compress.payloads import OneBit
from downpour.compress.payloads import Payload
from downpour.compress.payloads import Signs
from downpour.compress.payloads import Sparse
from downpour.compress.payloads import decode
from downpour.compress.quantize import fp16
from downpour.compress.quantize import none
from downpour.compress.quantize import onebit
from downpour.compress.registry import COMPRESSORS
from downpour.compress.registry import FEEDBACK_BY_DEFAULT
from downpour.compress.registry import parse
from downpour.compress.sparsify import ThresholdState
from downpour.compress.sparsify import threshold
from downpour.compress.sparsify import topk

__all__ = [
    "COMPRESSORS",
    "FEEDBACK_BY_DEFAULT",
    "PAYLOADS",
    "CodedIndices",
    "Compressor",
    "Dense",
    "EmptyState",
    "ErrorFeedbackState",
    "MalformedPayload",
    "OneBit",
    "Payload",
    "Signs",
    "Sparse",
    "Stream",
    "ThresholdState",
    "Transform",
    "chain",
    "compression_counters",
    "code_indices",
    "decode",
    "decode_indices",
    "entropy",
    "error_feedback",
    "fp16",
    "none",
    "onebit",
    "parse",
    "residual_of",
    "threshold",
    "topk",
]
