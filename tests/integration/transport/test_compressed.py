"""Compressed pushes: the payload's bytes on the wire, decoded and checked on the shard."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from downpour import compress
from downpour.flat import shard_ranges
from downpour.server import ServerShard
from downpour.transport import ParameterClient
from downpour.transport import downpour_pb2 as pb
from downpour.transport.payload import max_payload_bytes, to_bytes
from tests.integration.transport.test_validation import rejection
from tests.optimizers import sgd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SIZE = 1000


@pytest.mark.parametrize("spec", ["none", "fp16", "topk:0.05", "threshold:tau=0.5,entropy", "onebit"])
@pytest.mark.parametrize("shared_memory", [False, True], ids=["network", "shared"])
def test_a_compressed_push_applies_what_decode_gives(serve, connect, spec, shared_memory):
    shard = ServerShard(torch.zeros(SIZE), optimizer=sgd())
    client = connect(serve(shard).address, shared_memory=shared_memory)
    compressor = compress.parse(spec)
    update = torch.randn(SIZE)
    payload, _ = compressor.encode(update, compressor.init(update))
    sent_before = client.bytes_sent
    result = client.push(0, 0, payload)
    assert result.applied
    _, params = client.pull()
    torch.testing.assert_close(params, -compressor.decode(payload))
    if not shared_memory:
        # What went on the wire is the payload plus a header of a few dozen bytes.
        assert payload.nbytes <= client.bytes_sent - sent_before <= payload.nbytes + 64


def test_threshold_pushes_carry_a_hundredth_of_the_dense_bytes(serve, connect):
    shard = ServerShard(torch.zeros(100_000), optimizer=sgd())
    client = connect(serve(shard).address)
    compressor = compress.parse("threshold:tau=2,entropy")
    update = 0.4 * torch.randn(100_000)
    update[:200] = 3.0  # these cross tau; nearly all the rest wait in the residual
    payload, _ = compressor.encode(update, compressor.init(update))
    client.push(0, 0, payload)
    assert client.bytes_sent * 100 < 4 * 100_000
    _, params = client.pull()
    crossed = update.abs() >= 2
    assert torch.equal(params[crossed], -2.0 * update[crossed].sign()) and not params[~crossed].any()


def test_parameter_client_pushes_one_payload_per_shard(serve, token):
    ranges = shard_ranges(1000, 2)
    addresses = [serve(ServerShard(torch.zeros(r.stop - r.start), shard=r, optimizer=sgd())).address
                 for r in ranges]
    with ParameterClient(addresses, ranges, token, timeout=20) as client:
        update = torch.randn(1000)
        parts = [compress.Dense(update[r.start : r.stop].clone()) for r in ranges]
        client.push_all(0, [0, 0], parts)
        _, params = client.pull_all()
        torch.testing.assert_close(params, -update)
        with pytest.raises(ValueError, match="one per shard"):
            client.push_all(0, [1, 1], parts[:1])


def push_of(data: bytes, *, size: int = SIZE, payload_bytes: int | None = None) -> pb.PushChunk:
    header = pb.PushHeader(shard_id=0, worker=0, version=0, kind=pb.GRADIENT, encoding=pb.COMPRESSED,
                           shape=[size], num_chunks=1,
                           payload_bytes=len(data) if payload_bytes is None else payload_bytes)
    return pb.PushChunk(seq=0, header=header, values=data)


def signs(indices, *, size=SIZE, negative=b"\x00", tau=1.0) -> bytes:
    message = pb.Compressed(signs=pb.Compressed.Signs(
        size=size, nnz=len(indices), tau=tau,
        indices=pb.Compressed.Indices(raw=np.asarray(indices, "<i4").tobytes()), negative=negative))
    return message.SerializeToString()


FORGED = {
    # name: (push, reject code, words the message must contain)
    "index-out-of-range": (push_of(signs([3, SIZE])), "BAD_PAYLOAD", "out of range"),
    "unsorted-indices": (push_of(signs([5, 3])), "BAD_PAYLOAD", "increasing"),
    "truncated-bits": (push_of(signs(list(range(9)), negative=b"\x00")), "BAD_PAYLOAD", "negative"),
    "wrong-count": (push_of(pb.Compressed(sparse=pb.Compressed.Sparse(
        size=SIZE, nnz=3, dtype=pb.FLOAT32, indices=pb.Compressed.Indices(raw=np.arange(3, dtype="<i4").tobytes()),
        values=np.ones(2, "<f4").tobytes())).SerializeToString()), "BAD_PAYLOAD", "values"),
    "other-size": (push_of(signs([1], size=SIZE + 1)), "BAD_PAYLOAD", "size mismatch"),
    "garbage": (push_of(b"\xff\xff\xff\xff"), "BAD_PAYLOAD", "do not parse"),
    "nan-tau": (push_of(signs([1], tau=float("nan"))), "BAD_PAYLOAD", "tau"),
    "nan-value": (push_of(to_bytes(compress.Dense(torch.full((SIZE,), float("nan"))))), "BAD_PAYLOAD", "finite"),
    "too-many-bytes": (push_of(b"\0" * 16, payload_bytes=max_payload_bytes(SIZE) + 1), "BAD_LENGTH", "takes 1 to"),
    "fewer-bytes-than-announced": (push_of(signs([1]), payload_bytes=200), "BAD_LENGTH", "values carried"),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_a_malformed_compressed_push_is_refused_and_changes_nothing(serve, token, stub, name):
    shard = ServerShard(torch.randn(SIZE), optimizer=sgd())
    rpc = stub(serve(shard).address)
    chunk, code, words = FORGED[name]
    before = shard.pull()
    with pytest.raises(grpc.RpcError) as caught:
        rpc.PushSmall(chunk, metadata=(("downpour-token", token),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found, message = rejection(caught.value)
    assert found == code and words in message, (found, message)
    version, params = shard.pull()
    assert version == before[0] and torch.equal(params, before[1])
    assert shard.status()["pushes"] == 0


@pytest.mark.parametrize("spec", ["onebit:chunk=1", "topk:1.0"])
@pytest.mark.parametrize("size", [1, 7, 4096, 16_384])
def test_the_payload_bound_admits_the_largest_honest_payloads(spec, size):
    """Onebit with one-element chunks (two scales and a bit an element) was once refused as too long."""
    vector = torch.randn(size)
    compressor = compress.parse(spec)
    payload, _ = compressor.encode(vector, compressor.init(vector))
    assert len(to_bytes(payload)) <= max_payload_bytes(size)
