"""Sandblaster's side of a shard: named vectors, vector ops, and partial gradients summed by portion."""

import pytest
import torch

from downpour.server import InvalidUpdate, ServerShard, SumPortions
from downpour.server import vectors as v


def sandblaster_shard(values=(1.0, 2.0, 3.0)):
    return ServerShard(torch.tensor(values), policy=SumPortions(), optimizer=lambda ps: torch.optim.SGD(ps, lr=1))


def test_ops_run_in_order_and_return_only_dot_products():
    shard = sandblaster_shard()
    values, version = shard.vector_ops([v.copy("d", "x"), v.scale("d", -2.0), v.axpy("d", 1.0, "x"),
                                        v.dot("d", "x"), v.zero("z"), v.dot("z", "d")])
    assert values == [-14.0, 0.0] and version == 0
    assert shard.pull()[1].tolist() == [1.0, 2.0, 3.0]  # reading x changes nothing


def test_writing_the_parameters_starts_a_new_pass():
    shard = sandblaster_shard()
    shard.push(0, 0, torch.ones(3), portion=0)
    assert shard.vector_ops([v.dot("g", "g")])[0] == [3.0]
    values, version = shard.vector_ops([v.copy("d", "g"), v.axpy("x", -1.0, "d"), v.dot("g", "g")])
    assert version == 1 and values == [3.0]  # within the call g is still the old pass's
    assert shard.vector_ops([v.dot("g", "g")])[0] == [0.0]  # the new version's is not summed yet
    assert shard.pull()[1].tolist() == [0.0, 1.0, 2.0]


def test_each_portion_of_a_pass_counts_once_and_old_versions_not_at_all():
    shard = sandblaster_shard()
    assert not shard.push(0, 0, torch.ones(3), portion=4).dropped
    assert shard.push(1, 0, 5 * torch.ones(3), portion=4).dropped  # a backup answered second
    assert not shard.push(1, 0, 2 * torch.ones(3), portion=5).dropped
    shard.vector_ops([v.scale("x", 1.0)])  # the coordinator moves on
    assert shard.push(2, 0, torch.ones(3), portion=6).dropped  # computed on the old parameters
    assert shard.vector_ops([v.dot("g", "g")])[0] == [0.0]
    with pytest.raises(InvalidUpdate, match="no portion"):
        shard.push(0, 1, torch.ones(3))


@pytest.mark.parametrize("ops, words", [
    ([("dot", "x")], "not one of"),
    ([("frobnicate", "x")], "not one of"),
    ([v.dot("x", "nope")], "no vector named 'nope'"),
    ([v.copy("Bad-Name", "x")], "is not 1-32"),
    ([v.scale("x", float("nan"))], "alpha is nan"),
    ([v.drop("x")], "cannot be dropped"),
    ([v.drop("q")], "no vector named 'q'"),
    ([v.copy(f"v{i}", "x") for i in range(v.MAX_VECTORS + 1)], "at most"),
    ([v.dot("x", "x")] * (v.MAX_OPS + 1), "at most"),
])
def test_a_bad_batch_is_refused_whole_and_changes_nothing(ops, words):
    shard = sandblaster_shard()
    with pytest.raises(InvalidUpdate, match=words):
        shard.vector_ops([v.copy("d", "x"), v.axpy("x", 1.0, "d"), *ops])
    assert shard.version == 0 and shard.pull()[1].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(InvalidUpdate, match="no vector named 'd'"):
        shard.vector_ops([v.dot("d", "d")])


def test_a_shard_of_another_policy_has_no_batch_gradient():
    shard = ServerShard(torch.ones(2), optimizer=lambda ps: torch.optim.SGD(ps, lr=1))
    with pytest.raises(InvalidUpdate, match="no vector named 'g'"):
        shard.vector_ops([v.dot("g", "x")])
