"""Contiguous shard ranges of the flat vector, balanced by size."""

from __future__ import annotations

from typing import NamedTuple


class ShardRange(NamedTuple):
    """The half-open range ``[start, stop)`` of the flat vector held by one shard."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def slice(self) -> slice:
        return slice(self.start, self.stop)


def shard_ranges(numel: int, num_shards: int) -> list[ShardRange]:
    """Split ``numel`` elements into ``num_shards`` contiguous ranges whose sizes differ by at most one.

    Example:
        >>> [r.size for r in shard_ranges(10, 3)]
        [4, 3, 3]
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if numel < num_shards:
        raise ValueError(f"cannot split {numel} parameters into {num_shards} non-empty shards")
    base, extra = divmod(numel, num_shards)
    ranges, start = [], 0
    for i in range(num_shards):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(ShardRange(i, start, stop))
        start = stop
    return ranges
