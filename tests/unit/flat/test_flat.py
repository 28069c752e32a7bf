import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from downpour.flat import (
    FlatParams,
    SparseUpdate,
    apply_sparse_,
    flatten,
    shard_ranges,
    sparsify,
    unflatten_into_,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_flat_params_are_views_of_the_module():
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatParams(model)
    assert flat.params.numel() == sum(p.numel() for p in before) == len(flat)
    assert torch.equal(flat.params, flatten(before))
    flat.params.mul_(2)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, 2 * b)
    with torch.no_grad():
        model[0].bias.fill_(7)
    assert torch.all(flat.params[20:24] == 7)


def test_backward_accumulates_into_the_flat_gradient():
    model = _net()
    flat = FlatParams(model)
    x = torch.randn(8, 5)
    model(x).sum().backward()
    reference = _net()
    reference(x).sum().backward()
    assert torch.allclose(flat.grads, flatten(p.grad for p in reference.parameters()))
    flat.zero_grad_()
    assert flat.grads.abs().sum() == 0
    model(x).sum().backward()
    assert torch.allclose(flat.sync_grads_(), flatten(p.grad for p in reference.parameters()))


def test_an_optimizer_step_moves_the_flat_vector():
    model = _net()
    flat = FlatParams(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).pow(2).sum().backward()
    expected = flat.params - 0.1 * flat.grads
    optimizer.step()
    assert torch.allclose(flat.params, expected)


def test_load_rejects_a_wrong_length():
    flat = FlatParams(_net())
    with pytest.raises(ValueError, match="expected a vector of 39"):
        flat.load_(torch.zeros(3))


@given(numel=st.integers(1, 10_000), shards=st.integers(1, 64))
def test_shard_ranges_cover_the_vector_balanced(numel, shards):
    if numel < shards:
        with pytest.raises(ValueError):
            shard_ranges(numel, shards)
        return
    ranges = shard_ranges(numel, shards)
    assert ranges[0].start == 0 and ranges[-1].stop == numel
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    sizes = [r.size for r in ranges]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60)
@given(values=st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.5, -2.0]), min_size=1, max_size=200))
def test_sparse_round_trip(values):
    vector = torch.tensor(values, dtype=torch.float32)
    update = sparsify(vector, force=True)
    assert torch.equal(update.to_dense(), vector)
    target = torch.ones_like(vector)
    apply_sparse_(target, update, alpha=0.5)
    assert torch.allclose(target, 1 + 0.5 * vector)
    smaller = sparsify(vector)
    if smaller is not None:
        assert smaller.nnz * 8 <= vector.numel() * 4 / 4


def test_apply_sparse_rejects_out_of_range_indices():
    bad = SparseUpdate(torch.tensor([0, 9]), torch.tensor([1.0, 1.0]), 5)
    with pytest.raises(ValueError):
        apply_sparse_(torch.zeros(5), bad)


def test_unflatten_into_round_trip():
    tensors = [torch.zeros(2, 3), torch.zeros(4)]
    unflatten_into_(torch.arange(10.0), tensors)
    assert torch.equal(flatten(tensors), torch.arange(10.0))


def test_a_dense_vector_goes_dense_without_making_indices(monkeypatch):
    def no_indices(*args, **kwargs):
        raise AssertionError("sparsify built the indices of a vector it sends dense")

    monkeypatch.setattr(torch, "nonzero", no_indices)
    dense = torch.randn(10_000)
    dense[::3] = 0.0  # two thirds nonzero: sparse would take a third more bytes
    assert sparsify(dense) is None
    half = torch.zeros(10)
    half[:5] = 1.0  # exactly the break-even: dense, as sparse is no smaller
    assert sparsify(half) is None
    quarter = torch.zeros(1000)
    quarter[::4] = 1.0  # half the bytes sparse, but not worth listing 250 entries of 1000
    assert sparsify(quarter) is None


def test_a_sparse_vector_goes_sparse_with_its_nonzero_entries():
    torch.manual_seed(0)
    vector = torch.zeros(10_000)
    where = torch.randperm(10_000)[:400]
    vector[where] = torch.randn(400)
    update = sparsify(vector)
    assert isinstance(update, SparseUpdate)
    eighth = torch.zeros(1000)
    eighth[::8] = 1.0  # a quarter of the bytes: sparse
    assert sparsify(eighth).nnz == 125
    expected = torch.nonzero(vector).reshape(-1)
    assert torch.equal(update.indices, expected)
    assert torch.equal(update.values, vector[expected])
    assert update.size == 10_000 and update.nnz == 400
    assert torch.equal(update.to_dense(), vector)
    before = vector.clone()
    update.values.add_(1.0)  # the values are a copy, not a view of the vector
    assert torch.equal(vector, before)


def test_sparsify_counts_negative_zero_as_an_entry():
    # A -0.0 travels (adding it changes nothing); a plain 0.0 does not.
    vector = torch.tensor([0.0, -0.0, 3.0] + [0.0] * 13)
    update = sparsify(vector)
    assert update.indices.tolist() == [1, 2]
    assert torch.equal(torch.ones(16).index_add_(0, update.indices, update.values),
                       torch.ones(16) + vector)
