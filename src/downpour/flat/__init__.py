"""A model's parameters and gradients as one contiguous float32 vector.

Every strategy exchanges the same thing: the flat vector, its gradient, or a
dense or sparse update of the same length. Parameter-server shards are
contiguous ranges of it, balanced by size.
"""

from downpour.flat.buffers import combine_buffers_, decode_buffers_, encode_buffers, has_buffers
from downpour.flat.vector import FlatParams, flatten, unflatten_into_
from downpour.flat.shards import ShardRange, shard_ranges
from downpour.flat.sparse import SparseUpdate, apply_sparse_, sparsify

__all__ = [
    "FlatParams",
    "ShardRange",
    "SparseUpdate",
    "apply_sparse_",
    "combine_buffers_",
    "decode_buffers_",
    "encode_buffers",
    "flatten",
    "has_buffers",
    "shard_ranges",
    "sparsify",
    "unflatten_into_",
]
