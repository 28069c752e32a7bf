"""What each compressor does, and how they compose."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import downpour.compress
from downpour.compress import (
    Dense,
    Signs,
    Sparse,
    chain,
    code_indices,
    decode_indices,
    entropy,
    error_feedback,
    fp16,
    none,
    onebit,
    threshold,
    topk,
)
from downpour.compress.coding import leb128, unleb128
from downpour.compress.sparsify import num_kept
from downpour.transport.payload import from_bytes, to_bytes


def _encode(compressor, x):
    return compressor.encode(x, compressor.init(x))


# -- top-k -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "size", "k"),
    [(0.07, 100, 7), (0.01, 10, 1), (1e-9, 5, 1), (1.0, 9, 9), (0.5, 3, 2), (0.5, 0, 0)],
)
def test_topk_keeps_max_1_ceil_ratio_n(ratio, size, k):
    assert num_kept(ratio, size) == k


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-20, 20), min_size=1, max_size=300),
    ratio=st.floats(0.001, 1.0),
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(values, ratio):
    x = torch.tensor(values, dtype=torch.float32) / 4  # many ties
    payload, _ = _encode(topk(ratio), x)
    k = max(1, math.ceil(round(ratio * x.numel(), 6)))
    kept = payload.indices.long()
    assert payload.nnz == k and payload.indices.dtype == torch.int32
    assert bool((kept[1:] > kept[:-1]).all())
    assert torch.equal(payload.values, x[kept])
    dropped = torch.ones(x.numel(), dtype=torch.bool)
    dropped[kept] = False
    if bool(dropped.any()):
        assert float(x[kept].abs().min()) >= float(x[dropped].abs().max())


def test_topk_under_error_feedback_sends_every_entry_eventually():
    compressor = error_feedback(topk(0.25))
    x = torch.tensor([4.0, 3.0, 2.0, 1.0])
    state = compressor.init(x)
    sent = torch.zeros(4)
    for _ in range(16):
        payload, state = compressor.encode(x, state)
        sent += payload.to_dense()
    assert bool((sent > 0).all())  # one entry a step, yet each is sent within 16 steps
    assert torch.equal(sent + state.residual, 16 * x)


# -- threshold ---------------------------------------------------------------


def test_threshold_sends_only_plus_or_minus_tau_and_keeps_the_rest():
    x = torch.tensor([2.5, -2.0, 1.9, -1.99, 0.0, 7.0])
    payload, state = _encode(threshold(2.0), x)
    assert isinstance(payload, Signs) and payload.tau == 2.0
    assert torch.equal(payload.to_dense(), torch.tensor([2.0, -2.0, 0.0, 0.0, 0.0, 2.0]))
    expected = torch.tensor([0.5, 0.0, 1.9, -1.99, 0.0, 5.0]).double()
    torch.testing.assert_close(state.residual, x.double() - payload.to_dense().double())
    torch.testing.assert_close(state.residual, expected, atol=1e-6, rtol=0)
    payload, state = threshold(2.0).encode(torch.full((6,), 0.125), state)
    assert torch.equal(payload.positions, torch.tensor([2, 5], dtype=torch.int32))


def test_threshold_sent_plus_residual_equals_the_inputs_exactly():
    """Dyadic inputs (multiples of 2**-10): every float64 step is exact, so equality is exact."""
    generator = torch.Generator().manual_seed(1)
    compressor = threshold(2.0)
    inputs = [
        torch.randint(-4096, 4097, (5000,), generator=generator).float() / 1024 for _ in range(20)
    ]
    state = compressor.init(inputs[0])
    sent = torch.zeros(5000, dtype=torch.float64)
    for x in inputs:
        payload, state = compressor.encode(x, state)
        decoded = payload.to_dense()
        assert set(decoded.unique().tolist()) <= {-2.0, 0.0, 2.0}
        sent += decoded.double()
    assert torch.equal(sent + state.residual, sum(x.double() for x in inputs))
    assert float(state.residual.abs().max()) < 2.0 + 4.0 * 20  # one quantum a step at most


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.lists(st.integers(-(2**20), 2**20), min_size=8, max_size=8), min_size=1, max_size=10
    ),
    tau=st.sampled_from([0.25, 1.0, 2.0, 3.0, 1000.0]),
)
def test_threshold_exactness_property(steps, tau):
    compressor = threshold(tau)
    inputs = [torch.tensor(step, dtype=torch.float32) / 2**12 for step in steps]
    state = compressor.init(inputs[0])
    sent = torch.zeros(8, dtype=torch.float64)
    for x in inputs:
        payload, state = compressor.encode(x, state)
        sent += to_dense_via_wire(payload, 8).double()
    assert torch.equal(sent + state.residual, sum(x.double() for x in inputs))


def to_dense_via_wire(payload, size):
    return from_bytes(to_bytes(payload), expected_size=size).to_dense()


def test_threshold_rounds_tau_to_float32_once():
    compressor = threshold(0.1)
    payload, state = _encode(compressor, torch.tensor([0.25], dtype=torch.float32))
    assert payload.tau == float(np.float32(0.1)) == to_dense_via_wire(payload, 1).item()
    assert state.residual.item() == float(np.float32(0.25)) - float(np.float32(0.1))


def test_threshold_on_a_million_gradient_like_entries_is_much_smaller_than_dense():
    generator = torch.Generator().manual_seed(0)
    size = 1 << 20
    compressor = threshold(2.0)
    state = compressor.init(torch.zeros(size))
    for _ in range(3):
        gradient = torch.randn(size, generator=generator) * 0.01
        spikes = torch.randint(0, size, (size // 1000,), generator=generator)
        gradient[spikes] += torch.randn(spikes.numel(), generator=generator) * 3  # heavy tail
        payload, state = compressor.encode(gradient, state)
    assert 0 < payload.nnz < size // 1000
    assert payload.nbytes * 100 < 4 * size
    coded, _ = entropy().encode(payload, None)
    assert coded.nbytes < payload.nbytes


# -- one-bit -----------------------------------------------------------------


def test_onebit_reconstructs_each_chunk_from_the_means_of_its_two_signs():
    x = torch.tensor([1.0, 3.0, -2.0, -4.0, 0.0, -1.0, 5.0])
    payload, _ = _encode(onebit(chunk=3), x)
    assert payload.num_chunks == 3
    torch.testing.assert_close(payload.positive, torch.tensor([2.0, 0.0, 5.0]))
    torch.testing.assert_close(payload.negative, torch.tensor([-2.0, -2.5, 0.0]))
    torch.testing.assert_close(
        payload.to_dense(), torch.tensor([2.0, 2.0, -2.0, -2.5, 0.0, -2.5, 5.0])
    )


def test_onebit_keeps_each_chunks_sum_and_costs_about_a_bit_per_element():
    x = torch.randn(10_000)
    payload, _ = _encode(onebit(chunk=500), x)
    decoded = payload.to_dense()
    torch.testing.assert_close(
        decoded.view(20, 500).sum(1), x.view(20, 500).sum(1), atol=1e-3, rtol=1e-5
    )
    assert payload.nbytes < 10_000 / 8 * 1.2
    assert payload.ratio > 25


# -- index coding ------------------------------------------------------------


def test_varints_round_trip_at_every_length_boundary():
    values = np.array(
        [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21, 2**28 - 1, 2**28, 2**32 - 1], np.uint64
    )
    data = leb128(values)
    assert data.size == 1 + 1 + 1 + 2 + 2 + 3 + 4 + 4 + 5 + 5
    assert np.array_equal(unleb128(data, values.size), values)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 2**31 - 1), max_size=200))
def test_coded_indices_decode_to_the_same_indices(chosen):
    indices = torch.tensor(sorted(chosen), dtype=torch.int32)
    coded = code_indices(indices)
    assert torch.equal(decode_indices(coded.data, indices.numel(), 2**31), indices)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_coded_indices_are_smaller_than_int32(kind):
    generator = torch.Generator().manual_seed(0)
    if kind == "random":  # 1% of a million
        indices = torch.randperm(1 << 20, generator=generator)[: 1 << 13].sort().values
    else:  # runs of 64 consecutive entries
        starts = torch.randperm(1 << 14, generator=generator)[:128].sort().values * 64
        indices = (starts[:, None] + torch.arange(64)).reshape(-1)
    indices = indices.to(torch.int32)
    coded = code_indices(indices)
    assert torch.equal(decode_indices(coded.data, indices.numel(), 1 << 20), indices)
    assert len(coded.data) < (2 if kind == "random" else 0.2) * indices.numel()


# -- composition -------------------------------------------------------------


def test_chain_topk_then_fp16_quantizes_the_kept_values():
    x = torch.tensor([0.1, -3.3, 0.2, 7.7])
    payload, _ = _encode(chain(topk(0.5), fp16()), x)
    assert isinstance(payload, Sparse) and payload.values.dtype == torch.float16
    assert torch.equal(payload.indices, torch.tensor([1, 3], dtype=torch.int32))
    assert torch.equal(payload.to_dense(), torch.tensor([0.0, -3.3, 0.0, 7.7]).half().float())


def test_chain_refuses_stages_that_do_not_fit_when_built():
    with pytest.raises(ValueError, match=r"stage 2 \(fp16\).*Signs.*takes Dense, Sparse, OneBit"):
        chain(threshold(1.0), fp16())
    with pytest.raises(ValueError, match=r"stage 2 \(topk:ratio=0.1\).*Sparse"):
        chain(topk(0.1), topk(0.1))
    with pytest.raises(ValueError, match="at least one"):
        chain()


def test_error_feedback_is_refused_where_it_would_count_twice_or_cannot_apply():
    with pytest.raises(ValueError, match="already keeps a residual"):
        error_feedback(threshold(1.0))
    with pytest.raises(ValueError, match="already keeps a residual"):
        error_feedback(error_feedback(topk(0.1)))
    with pytest.raises(ValueError, match="takes Sparse, Signs"):
        error_feedback(entropy())


def test_a_stage_refuses_a_payload_it_cannot_take():
    with pytest.raises(TypeError, match="entropy:level=6 cannot take a Dense payload"):
        entropy().encode(torch.ones(3), None)


@pytest.mark.parametrize("x", [torch.ones(2, 2), torch.ones(3, dtype=torch.float64)])
def test_compressors_take_only_flat_float32_vectors(x):
    with pytest.raises(ValueError, match="flat 1-D float32"):
        none().encode(x, None)


def test_fp16_clamps_instead_of_overflowing():
    payload, _ = _encode(fp16(), torch.tensor([1e6, -1e6, 1.0]))
    assert bool(torch.isfinite(payload.values).all())
    assert payload.to_dense().tolist() == [65504.0, -65504.0, 1.0]


def test_dense_payload_owns_its_values():
    x = torch.ones(3)
    payload, _ = _encode(none(), x)
    x.zero_()
    assert isinstance(payload, Dense) and payload.to_dense().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "factory",
    [
        lambda: topk(0),
        lambda: topk(1.5),
        lambda: topk(math.nan),
        lambda: threshold(0),
        lambda: threshold(-1),
        lambda: threshold(math.inf),
        lambda: threshold(1e-60),
        lambda: onebit(0),
        lambda: entropy(0),
    ],
)
def test_factories_refuse_bad_options(factory):
    with pytest.raises(ValueError):
        factory()


def test_compress_does_not_import_the_transport():
    """Layers point one way: compress sits below transport."""
    package = Path(downpour.compress.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                assert not any(n.startswith(("downpour.transport", "grpc")) for n in names), path


@pytest.mark.parametrize(
    "module",
    ["", ".base", ".payloads", ".quantize", ".sparsify", ".coding", ".registry"],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    names = [f"downpour.compress{module}"] + (["downpour.transport.payload"] if not module else [])
    for name in names:
        result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch})
        assert result.failed == 0, name


@pytest.mark.parametrize("spec", ["none", "fp16", "topk:0.3", "threshold:0.5", "onebit:chunk=3"])
def test_add_to_adds_the_decoded_vector_in_place(spec):
    compressor = downpour.compress.parse(spec)
    x = torch.randn(10)
    payload, _ = compressor.encode(x, compressor.init(x))
    target = torch.ones(10)
    assert payload.add_to_(target, alpha=-2.0) is target
    torch.testing.assert_close(target, 1 - 2 * payload.to_dense())
    with pytest.raises(ValueError, match="for 10 elements cannot be added to a tensor of shape"):
        payload.add_to_(torch.ones(11))
