"""The hand-written chunk codec writes and reads exactly what protobuf does (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from downpour.transport import codec
from downpour.transport import downpour_pb2 as pb
from downpour.transport.codec import Malformed

pytestmark = pytest.mark.integration


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_matches_protobuf(value):
    encoded = b"\x48" + codec.varint(value)  # field 9 of PushHeader, uint64 nnz
    assert pb.PushHeader.FromString(encoded).nnz == value
    if value:  # proto3 writes no field for 0
        assert pb.PushHeader(nnz=value).SerializeToString() == encoded


@settings(max_examples=40, deadline=None)
@given(
    numel=st.integers(min_value=1, max_value=3000),
    chunk_bytes=st.integers(min_value=1, max_value=5000),
    half=st.booleans(),
    version=st.integers(min_value=0, max_value=2**40),
)
def test_tensor_frames_parse_with_protobuf_and_back(numel, chunk_bytes, half, version):
    tensor = torch.randn(numel)
    wire = pb.FLOAT16 if half else pb.FLOAT32
    frames = codec.tensor_frames(3, version, tensor, wire, chunk_bytes)
    data = b""
    for seq, frame in enumerate(frames):
        message = pb.TensorChunk.FromString(frame)
        ours = codec.parse_tensor_chunk(frame)
        assert message.seq == ours.seq == seq
        assert message.data == bytes(ours.data)
        assert message.HasField("header") == (seq == 0) == (ours.header is not None)
        if seq == 0:
            assert message.header == ours.header
            assert (message.header.shard_id, message.header.version) == (3, version)
            assert list(message.header.shape) == [numel]
            assert message.header.num_chunks == len(frames)
        data += message.data
    expected = tensor.half() if half else tensor
    assert data == expected.numpy().tobytes()


@settings(max_examples=40, deadline=None)
@given(
    nnz=st.integers(min_value=0, max_value=2000),
    chunk_bytes=st.integers(min_value=1, max_value=4000),
    sparse=st.booleans(),
)
def test_push_frames_parse_with_protobuf_and_back(nnz, chunk_bytes, sparse):
    values = np.random.default_rng(nnz).standard_normal(max(nnz, 1)).astype("<f4")
    indices = np.arange(values.size, dtype="<i4") * 3 if sparse else None
    header = pb.PushHeader(shard_id=1, worker=2, version=7, kind=pb.DELTA, dtype=pb.FLOAT32)
    frames = list(codec.push_frames(header, values, indices, chunk_bytes))
    assert header.num_chunks == len(frames)
    got_values, got_indices = b"", b""
    for seq, frame in enumerate(frames):
        message = pb.PushChunk.FromString(frame)
        ours = codec.parse_push_chunk(frame)
        assert message.seq == ours.seq == seq
        assert message.values == bytes(ours.values) and message.indices == bytes(ours.indices)
        assert (ours.header is not None) == (seq == 0)
        if seq == 0:
            assert message.header == ours.header == header
        # Protobuf's own serialization parses the same with ours.
        again = codec.parse_push_chunk(message.SerializeToString())
        assert (again.seq, again.header, bytes(again.values)) == (
            ours.seq,
            ours.header,
            bytes(ours.values),
        )
        got_values += message.values
        got_indices += message.indices
    assert got_values == values.tobytes()
    assert got_indices == (b"" if indices is None else indices.tobytes())


def test_parse_follows_protobuf_merge_rules():
    first = pb.PushChunk(seq=4, header=pb.PushHeader(shard_id=1, worker=2), values=b"old")
    second = pb.PushChunk(seq=5, header=pb.PushHeader(version=9), values=b"new")
    unknown = b"\xa8\x06\x01" + b"\xb2\x06\x02hi" + b"\xbd\x06abcd" + b"\xb9\x06" + b"12345678"
    data = first.SerializeToString() + unknown + second.SerializeToString()
    reference = pb.PushChunk.FromString(data)
    ours = codec.parse_push_chunk(data)
    assert (ours.seq, bytes(ours.values)) == (reference.seq, reference.values) == (5, b"new")
    assert ours.header == reference.header
    assert (ours.header.shard_id, ours.header.worker, ours.header.version) == (1, 2, 9)


def test_payloads_are_views_not_copies():
    data = pb.TensorChunk(seq=0, data=b"x" * 1000).SerializeToString()
    frame = codec.parse_tensor_chunk(data)
    assert isinstance(frame.data, memoryview) and frame.data.obj is data


@pytest.mark.parametrize(
    "raw", [b"\x08", b"\x08\xff", b"\x1a\x05ab", b"\x00", b"\x0f", b"\x08" + b"\xff" * 11]
)
def test_garbage_is_malformed_not_an_exception(raw):
    assert isinstance(codec.parse_push_chunk(raw), Malformed)
    assert isinstance(codec.parse_tensor_chunk(raw), Malformed)


def test_tolerant_parse_turns_decode_errors_into_malformed():
    assert isinstance(codec.tolerant(pb.PullRequest.FromString)(b"\x0a\xff"), Malformed)
    assert (
        codec.tolerant(pb.PullRequest.FromString)(
            pb.PullRequest(shard_id=2).SerializeToString()
        ).shard_id
        == 2
    )


def test_push_pull_messages_parse_with_protobuf():
    header = pb.PushHeader(shard_id=0, worker=1, version=2, kind=pb.DELTA, dtype=pb.FLOAT32)
    values = np.arange(300, dtype="<f4")  # 1200 bytes: a two-byte length
    frame = next(codec.push_frames(header, values))
    pull = pb.PullRequest(shard_id=0, wait_version=3, dtype=pb.FLOAT16)
    expected = pb.PushPullRequest(push=pb.PushChunk.FromString(frame), pull=pull)
    assert pb.PushPullRequest.FromString(codec.push_pull_request(frame, pull)) == expected
    (chunk,) = codec.tensor_frames(0, 7, torch.arange(5.0), pb.FLOAT32)
    reply = pb.PushReply(applied=True, staleness=1, version=7)
    parsed = pb.PushPullReply.FromString(codec.push_pull_reply(reply, chunk))
    assert parsed.push == reply and parsed.pull == pb.TensorChunk.FromString(chunk)
    ours = codec.tensor_frame_of(parsed.pull)
    assert (ours.seq, ours.header.version, bytes(ours.data)) == (
        0,
        7,
        torch.arange(5.0).numpy().tobytes(),
    )
