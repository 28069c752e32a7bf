"""The same checks for every registered compressor and a few chains."""

import pytest
import torch

from downpour import compress
from downpour.compress import error_feedback, parse, residual_of
from downpour.transport.payload import from_bytes, to_bytes

# Every registered name appears in at least one spec (checked below).
SPECS = [
    "none",
    "fp16",
    "topk:0.01",
    "topk:0.2,fp16",
    "topk:0.05,fp16,entropy",
    "topk:0.1,entropy,fp16",
    "threshold:tau=0.5",
    "threshold:tau=0.5,entropy",
    "onebit",
    "onebit:chunk=100,fp16",
]
SIZES = [0, 1, 1037]
STEPS = 20


def _inputs(size: int, steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) * 0.3 for _ in range(steps)]


def _run(compressor, inputs):
    """Encode ``inputs`` in turn; every payload and the final state."""
    state = compressor.init(inputs[0])
    payloads = []
    for x in inputs:
        payload, state = compressor.encode(x, state)
        payloads.append(payload)
    return payloads, state


def test_every_registered_compressor_is_tested():
    tested = {stage.partition(":")[0] for spec in SPECS for stage in spec.split(",")}
    assert tested == set(compress.COMPRESSORS)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_decode_keeps_shape_and_dtype_and_leaves_the_input_alone(spec, size):
    compressor = parse(spec)
    x = torch.randn(size)
    before = x.clone()
    payload, _ = compressor.encode(x, compressor.init(x))
    assert torch.equal(x, before)
    decoded = compressor.decode(payload)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    x.add_(1.0)  # the payload owns its tensors
    assert torch.equal(compressor.decode(payload), decoded)
    assert isinstance(payload, compress.PAYLOADS) and payload.size == size


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_nbytes_is_the_serialized_size_and_the_wire_round_trip_is_exact(spec, size):
    payloads, _ = _run(parse(spec), _inputs(size, steps=5))
    for payload in payloads:
        data = to_bytes(payload)
        assert payload.nbytes == len(data)
        assert payload.raw_nbytes == 4 * size
        received = from_bytes(data, expected_size=size)
        assert type(received) is type(payload)
        assert torch.equal(received.to_dense(), payload.to_dense())
        assert received.nbytes == payload.nbytes


@pytest.mark.parametrize("spec", SPECS)
def test_what_was_sent_plus_the_residual_is_what_came_in(spec):
    compressor = parse(spec, feedback=False)
    if not compressor.feedback:
        compressor = error_feedback(compressor)
    inputs = _inputs(1037)
    payloads, state = _run(compressor, inputs)
    sent = sum(p.to_dense().double() for p in payloads)
    total = sum(x.double() for x in inputs)
    torch.testing.assert_close(sent + residual_of(state).double(), total, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_parse_adds_error_feedback_to_biased_compressors(spec):
    compressor = parse(spec)
    biased = any(stage.startswith(("topk", "onebit")) for stage in spec.split(","))
    assert compressor.name.startswith("error_feedback(") == biased
    stateless = spec in ("none", "fp16")
    assert (residual_of(compressor.init(torch.zeros(3))) is None) == stateless
