"""Received payloads: every malformed one is refused with a message naming the problem."""

import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from downpour.compress import MalformedPayload, code_indices, parse
from downpour.compress.coding import leb128
from downpour.transport import downpour_pb2 as pb
from downpour.transport.payload import from_bytes, payload_to_proto, to_bytes

SIZE = 100


def _message(spec: str, seed: int = 0) -> pb.Compressed:
    x = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed))
    compressor = parse(spec)
    payload, _ = compressor.encode(x, compressor.init(x))
    return payload_to_proto(payload)


def _int32(values) -> bytes:
    return np.asarray(values, "<i4").tobytes()


def _deflated(gaps) -> bytes:
    return zlib.compress(leb128(np.asarray(gaps, np.uint64)).tobytes())


def _refused(message: pb.Compressed | bytes, match: str, expected_size: int = SIZE) -> None:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    with pytest.raises(MalformedPayload, match=match):
        from_bytes(data, expected_size=expected_size)


def _sparse(**fields) -> pb.Compressed:
    """A valid 3-entry sparse message, with ``fields`` changed."""
    message = pb.Compressed()
    sparse = message.sparse
    sparse.size, sparse.nnz, sparse.dtype = SIZE, 3, pb.FLOAT32
    sparse.indices.raw = _int32([1, 5, 9])
    sparse.values = np.ones(3, "<f4").tobytes()
    for name, value in fields.items():
        if name in ("raw", "deflated"):
            setattr(sparse.indices, name, value)
        else:
            setattr(sparse, name, value)
    return message


def test_a_valid_forged_message_is_accepted():
    payload = from_bytes(_sparse().SerializeToString(), expected_size=SIZE)
    assert payload.positions.tolist() == [1, 5, 9]
    assert issubclass(MalformedPayload, ValueError)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"raw": _int32([1, 5, 100])}, "index 100 out of range for a vector of 100"),
        ({"raw": _int32([-1, 5, 9])}, "index -1 out of range"),
        ({"raw": _int32([1, 5, 5])}, "not strictly increasing: index 5 at position 2 follows 5"),
        ({"raw": _int32([1, 9, 5])}, "not strictly increasing"),
        ({"raw": _int32([1, 5])}, "wrong count: indices has 8 bytes, expected 3 x 4"),
        ({"raw": _int32([1, 5, 9])[:-1]}, "wrong count: indices has 11 bytes"),
        ({"nnz": 4}, "wrong count: indices has 12 bytes, expected 4 x 4"),
        ({"nnz": 101}, "wrong count: 101 entries in a vector of 100"),
        (
            {"values": np.ones(2, "<f4").tobytes()},
            "wrong count: values has 8 bytes, expected 3 x 4",
        ),
        ({"values": np.array([1, np.nan, 1], "<f4").tobytes()}, "non-finite values"),
        ({"values": np.array([1, np.inf, 1], "<f4").tobytes()}, "non-finite values"),
        ({"dtype": pb.INT32}, "values must be FLOAT32 or FLOAT16, got INT32"),
        ({"size": 99}, "size mismatch: it is for a vector of 99 elements, expected 100"),
        ({"size": 2**60}, "size mismatch: it is for a vector of 1152921504606846976 elements"),
        ({"deflated": b"not zlib"}, "coded indices: not a zlib stream"),
        ({"deflated": _deflated([1, 3, 3])[:-3]}, "coded indices: truncated zlib stream"),
        ({"deflated": _deflated([1, 3, 3]) + b"x"}, "coded indices: bytes after the end"),
        ({"deflated": _deflated([1, 3])}, "coded indices: wrong count: 2 varints, expected 3"),
        ({"deflated": _deflated([1, 3, 95])}, "coded indices: index 101 out of range"),
        ({"deflated": zlib.compress(b"\x01\x03\x83")}, "coded indices: truncated, the last varint"),
        ({"deflated": zlib.compress(b"\x01\x03" + b"\x80" * 5 + b"\x01")}, "longer than 5 bytes"),
        ({"deflated": zlib.compress(bytes(10**6))}, "inflate to more than 15 bytes for 3 indices"),
    ],
)
def test_bad_sparse_payloads_are_refused(fields, match):
    _refused(_sparse(**fields), match)


def test_missing_indices_are_refused():
    message = _sparse()
    message.sparse.ClearField("indices")
    _refused(message, "no indices")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xff\xff\xff", "bytes do not parse as a Compressed message"),
        (b"\x0a\x05\x01", "bytes do not parse"),
        (b"", "no kind"),
        (b"\x4a\x00", "no kind, or a kind this version does not know"),  # field 9
    ],
)
def test_garbage_and_unknown_kinds_are_refused(data, match):
    _refused(data, match)


def test_dense_payloads_are_checked():
    message = _message("none")
    message.dense.values = message.dense.values[:-4]
    _refused(message, "size mismatch: it is for a vector of 99 elements, expected 100")
    message.dense.values = message.dense.values + b"\x00"
    _refused(message, "size mismatch")
    message.dense.values = np.full(SIZE, np.nan, "<f4").tobytes()
    _refused(message, "non-finite values")
    message.dense.dtype = pb.INT64
    _refused(message, "values must be FLOAT32 or FLOAT16, got INT64")


def test_signs_payloads_are_checked():
    message = pb.Compressed()
    signs = message.signs
    signs.size, signs.nnz, signs.tau = SIZE, 9, 2.0
    signs.indices.raw = _int32(range(0, 90, 10))
    signs.negative = b"\x00\x01"
    assert from_bytes(message.SerializeToString(), expected_size=SIZE).to_dense()[80] == -2
    signs.negative = b"\x00"
    _refused(message, "negative bit array truncated: 1 bytes for 9 bits")
    signs.negative = b"\x00\x00\x00"
    _refused(message, "negative bit array too long")
    signs.negative = b"\x00\x03"
    _refused(message, "padding bits set after bit 9")
    signs.negative = b"\x00\x00"
    for tau in (0.0, -1.0, float("inf"), float("nan")):
        signs.tau = tau
        _refused(message, "tau must be positive and finite")


def test_onebit_payloads_are_checked():
    good = _message("onebit:chunk=30")
    assert from_bytes(good.SerializeToString(), expected_size=SIZE).num_chunks == 4
    cases = [
        ("bits", good.onebit.bits[:-1], "bits bit array truncated: 12 bytes for 100 bits"),
        ("bits", good.onebit.bits[:-1] + b"\xff", "padding bits set after bit 100"),
        (
            "positive",
            good.onebit.positive[:-4],
            "wrong count: positive has 12 bytes, expected 4 x 4",
        ),
        ("negative", np.array([0, 0, np.nan, 0], "<f4").tobytes(), "non-finite negative scales"),
        ("chunk", 0, "chunk must be at least 1, got 0"),
        ("chunk", 50, "wrong count: positive has 16 bytes, expected 2 x 4"),
        ("size", 10**12, "size mismatch"),
        ("dtype", pb.DTYPE_UNSPECIFIED, "FLOAT32 or FLOAT16, got DTYPE_UNSPECIFIED"),
    ]
    for field, value, match in cases:
        message = pb.Compressed()
        message.CopyFrom(good)
        setattr(message.onebit, field, value)
        _refused(message, match)


def test_huge_declared_sizes_are_refused_before_anything_is_allocated():
    message = _sparse(size=2**63, nnz=2**62)
    _refused(message, "size mismatch")
    # A coded-index bomb: a kilobyte inflating to a gigabyte would be cut at 5 bytes per index.
    bomb = zlib.compress(bytes(1 << 24), 9)
    assert len(bomb) < 20_000
    _refused(_sparse(deflated=bomb), "inflate to more than 15 bytes")


def test_expected_size_must_be_given_and_sane():
    data = _sparse().SerializeToString()
    with pytest.raises(TypeError):
        from_bytes(data)  # the receiver always says what it expects
    with pytest.raises(ValueError, match="expected_size must be non-negative"):
        from_bytes(data, expected_size=-1)


SPECS = [
    "none",
    "fp16",
    "topk:0.1,fp16",
    "topk:0.1,entropy",
    "threshold:tau=0.5",
    "threshold:tau=0.5,entropy",
    "onebit:chunk=16",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SPECS),
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=3),
)
def test_corrupted_payloads_are_refused_or_decode_to_a_valid_vector(spec, cut, flips):
    data = bytearray(_message(spec).SerializeToString())
    for position, mask in flips:
        data[position % len(data)] ^= mask
    data = bytes(data[: len(data) - cut % (len(data) + 1)])
    try:
        payload = from_bytes(data, expected_size=SIZE)
    except MalformedPayload:
        return
    decoded = payload.to_dense()
    assert decoded.shape == (SIZE,) and bool(torch.isfinite(decoded).all())


def test_to_bytes_refuses_what_is_not_a_payload():
    with pytest.raises(TypeError, match="not a compressed payload: Tensor"):
        to_bytes(torch.ones(3))


def test_coded_and_raw_indices_travel_alike():
    indices = torch.tensor([3, 4, 5, 50], dtype=torch.int32)
    message = _sparse(
        nnz=4, values=np.ones(4, "<f4").tobytes(), deflated=code_indices(indices).data
    )
    payload = from_bytes(message.SerializeToString(), expected_size=SIZE)
    assert torch.equal(payload.positions, indices)
    assert payload.nbytes == message.ByteSize()
