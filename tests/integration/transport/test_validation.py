"""Forged and malformed messages, sent with the generated stub, are refused and change nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from downpour.server import ServerShard
from downpour.transport import Refused
from downpour.transport import downpour_pb2 as pb

pytestmark = pytest.mark.integration

SIZE = 1000


def header(**overrides) -> pb.PushHeader:
    fields = {
        "shard_id": 0,
        "worker": 0,
        "version": 0,
        "kind": pb.GRADIENT,
        "encoding": pb.DENSE,
        "dtype": pb.FLOAT32,
        "shape": [SIZE],
        "num_chunks": 2,
    }
    return pb.PushHeader(**{**fields, **overrides})


def halves(values: np.ndarray) -> list[bytes]:
    data = values.astype("<f4").tobytes()
    return [data[: len(data) // 2], data[len(data) // 2 :]]


def dense(**overrides) -> list[pb.PushChunk]:
    first, second = halves(np.ones(SIZE, np.float32))
    return [
        pb.PushChunk(seq=0, header=header(**overrides), values=first),
        pb.PushChunk(seq=1, values=second),
    ]


def sparse(indices, values, index_dtype=pb.INT64, **overrides) -> list[pb.PushChunk]:
    fields = {
        "encoding": pb.SPARSE,
        "index_dtype": index_dtype,
        "nnz": len(indices),
        "num_chunks": 1,
    }
    head = header(**{**fields, **overrides})
    numpy_dtype = "<i8" if index_dtype == pb.INT64 else "<i4"
    return [
        pb.PushChunk(
            seq=0,
            header=head,
            values=np.asarray(values, "<f4").tobytes(),
            indices=np.asarray(indices, numpy_dtype).tobytes(),
        )
    ]


def with_nan() -> list[pb.PushChunk]:
    values = np.ones(SIZE, np.float32)
    values[SIZE - 3] = np.nan
    first, second = halves(values)
    return [pb.PushChunk(seq=0, header=header(), values=first), pb.PushChunk(seq=1, values=second)]


def with_inf() -> list[pb.PushChunk]:
    values = np.ones(SIZE, np.float32)
    values[5] = -np.inf
    first, second = halves(values)
    return [pb.PushChunk(seq=0, header=header(), values=first), pb.PushChunk(seq=1, values=second)]


FORGED = {
    # name: (chunks, reject code, words the message must contain)
    "truncated": (dense()[:1], "BAD_CHUNK_COUNT", "after 1 of 2 chunks"),
    "reversed": (dense()[::-1], "BAD_HEADER", "carries no header"),
    "reordered": (
        [
            pb.PushChunk(seq=0, header=header(num_chunks=3), values=b"\0" * 1000),
            pb.PushChunk(seq=2, values=b"\0" * 1000),
            pb.PushChunk(seq=1, values=b"\0" * 2000),
        ],
        "BAD_CHUNK_ORDER",
        "chunk 2 arrived where chunk 1 was due",
    ),
    "out-of-sequence": (
        [dense()[0], pb.PushChunk(seq=2, values=halves(np.ones(SIZE, np.float32))[1])],
        "BAD_CHUNK_ORDER",
        "chunk 2 arrived where chunk 1 was due",
    ),
    "repeated-chunk": (
        [dense()[0], pb.PushChunk(seq=0, values=b"\0" * 2000)],
        "BAD_CHUNK_ORDER",
        "chunk 0 arrived where chunk 1 was due",
    ),
    "extra-chunk": (dense() + [pb.PushChunk(seq=2, values=b"")], "BAD_CHUNK_COUNT", "more arrived"),
    "short": (
        [
            pb.PushChunk(seq=0, header=header(), values=b"\0" * 2000),
            pb.PushChunk(seq=1, values=b"\0" * 1000),
        ],
        "BAD_LENGTH",
        "values carried 3000 of the 4000 bytes",
    ),
    "wrong-length": (dense(shape=[SIZE + 1]), "BAD_LENGTH", "does not match shard 0 of 1000"),
    "two-dimensional": (dense(shape=[10, 100]), "BAD_LENGTH", "does not match shard 0 of 1000"),
    "wrong-dtype": (dense(dtype=pb.INT32), "BAD_DTYPE", "FLOAT32 or FLOAT16, got INT32"),
    "no-dtype": (dense(dtype=pb.DTYPE_UNSPECIFIED), "BAD_DTYPE", "got DTYPE_UNSPECIFIED"),
    "nan": (with_nan(), "NON_FINITE", "1 NaN or infinite"),
    "inf": (with_inf(), "NON_FINITE", "1 NaN or infinite"),
    "bad-shard": (dense(shard_id=3), "BAD_SHARD", "holds shard 0, the push is for shard 3"),
    "bad-kind": (dense(kind=pb.UPDATE_KIND_UNSPECIFIED), "BAD_KIND", "GRADIENT or DELTA"),
    "bad-encoding": (dense(encoding=7), "BAD_ENCODING", "DENSE, SPARSE or COMPRESSED"),
    "future-version": (dense(version=5), "BAD_VERSION", "only at version 0"),
    "negative-version": (dense(version=-1), "BAD_VERSION", "got -1"),
    "no-chunks-announced": (dense(num_chunks=0), "BAD_CHUNK_COUNT", "announces no chunks"),
    "second-header": (
        [
            pb.PushChunk(seq=0, header=header(), values=b"\0" * 2000),
            pb.PushChunk(seq=1, header=header(), values=b"\0" * 2000),
        ],
        "BAD_HEADER",
        "second header",
    ),
    "indices-on-dense": (
        [pb.PushChunk(seq=0, header=header(num_chunks=1), values=b"\0" * 4000, indices=b"\0" * 8)],
        "BAD_ENCODING",
        "DENSE push carries indices",
    ),
    "sparse-index-out-of-range": (sparse([3, SIZE], [1.0, 1.0]), "BAD_INDEX", "[0, 1000)"),
    "sparse-negative-index": (sparse([-2, 3], [1.0, 1.0], pb.INT32), "BAD_INDEX", "[0, 1000)"),
    "sparse-unsorted": (sparse([7, 3], [1.0, 1.0]), "BAD_INDEX", "strictly increasing"),
    "sparse-duplicate": (sparse([3, 3], [1.0, 1.0]), "BAD_INDEX", "strictly increasing"),
    "sparse-float-indices": (
        sparse([3], [1.0], pb.FLOAT32),
        "BAD_DTYPE",
        "INT32 or INT64, got FLOAT32",
    ),
    "sparse-nnz-too-big": (sparse([3], [1.0], nnz=SIZE + 1), "BAD_LENGTH", "nnz 1001 exceeds"),
    "sparse-nan": (sparse([3], [float("nan")]), "NON_FINITE", "NaN"),
    "sparse-missing-values": (
        [
            pb.PushChunk(
                seq=0,
                header=header(encoding=pb.SPARSE, index_dtype=pb.INT64, nnz=2, num_chunks=1),
                values=b"\0" * 4,
                indices=b"\0" * 16,
            )
        ],
        "BAD_LENGTH",
        "values carried 4 of the 8 bytes",
    ),
    "empty-stream": ([], "BAD_CHUNK_COUNT", "carried no chunks"),
    "oversized": (
        [
            pb.PushChunk(seq=0, header=header(), values=b"\0" * 2000),
            pb.PushChunk(seq=1, values=b"\0" * 2004),
        ],
        "BAD_LENGTH",
        "values exceed the 4000 bytes",
    ),
}


@pytest.fixture
def target(serve, token, stub):
    """A served shard, its stub, the token's metadata and its address."""
    shard = ServerShard(torch.randn(SIZE), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    server = serve(shard)
    return shard, stub(server.address), (("downpour-token", token),), server.address


def rejection(error: grpc.RpcError) -> tuple[str, str]:
    """The Reject code name and message a refused call carried in its trailing metadata."""
    for key, value in error.trailing_metadata() or ():
        if key == "downpour-reject-bin":
            reject = pb.Reject.FromString(value)
            return pb.RejectCode.Name(reject.code), reject.message
    raise AssertionError(f"no reject detail in {error}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(FORGED))
def test_a_forged_push_is_refused_with_invalid_argument_and_says_why(target, name):
    shard, stub, metadata, _ = target
    chunks, code, words = FORGED[name]
    before = shard.pull()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Push(iter(chunks), metadata=metadata, timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(code + ":")
    assert rejection(error) == (code, error.details()[len(code) + 2 :])
    assert words in error.details()
    after = shard.pull()
    assert after[0] == before[0] and torch.equal(after[1], before[1])


@pytest.mark.timeout(60)
def test_a_volley_of_bad_calls_leaves_the_parameters_bit_identical(target, token):
    shard, good_stub, metadata, _ = target
    before = shard.pull()[1].clone()
    for chunks, _, _ in FORGED.values():
        with pytest.raises(grpc.RpcError):
            good_stub.Push(iter(chunks), metadata=metadata, timeout=10)
    for bad_metadata in ((), (("downpour-token", "guess"),), (("downpour-token", token[:-1]),)):
        with pytest.raises(grpc.RpcError):
            good_stub.Push(iter(dense()), metadata=bad_metadata, timeout=10)
    assert torch.equal(shard.pull()[1], before)
    status = shard.status()
    assert (status["version"], status["pushes"], status["applied"]) == (0, 0, 0)
    # ...and the server still works.
    assert good_stub.Push(iter(dense()), metadata=metadata, timeout=10).applied
    assert torch.equal(shard.pull()[1], before - 0.1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "metadata", [(), (("downpour-token", "not-the-token"),)], ids=["missing", "wrong"]
)
def test_calls_without_the_right_token_are_unauthenticated(target, metadata):
    shard, stub, _, _ = target
    calls = [
        lambda: list(stub.Pull(pb.PullRequest(shard_id=0), metadata=metadata, timeout=10)),
        lambda: stub.Push(iter(dense()), metadata=metadata, timeout=10),
        lambda: stub.Status(pb.StatusRequest(shard_id=0), metadata=metadata, timeout=10),
        lambda: stub.Shutdown(pb.ShutdownRequest(), metadata=metadata, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rejection(caught.value)[0] == "BAD_TOKEN"
    assert shard.status()["pulls"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("token_given", ["", "wrong-token"], ids=["empty", "wrong"])
def test_the_client_raises_refused_for_a_bad_token(serve, connect, token_given):
    shard = ServerShard(torch.zeros(4))
    server = serve(shard)
    if not token_given:
        with pytest.raises(ValueError, match="token"):
            connect(server.address, token=token_given)
        return
    client = connect(server.address, token=token_given)
    with pytest.raises(Refused) as caught:
        client.pull()
    assert (caught.value.reason, caught.value.status) == ("BAD_TOKEN", "UNAUTHENTICATED")
    assert "wrong token" in str(caught.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.PullRequest(shard_id=2), "BAD_SHARD", "holds shard 0, not shard 2"),
        (pb.PullRequest(shard_id=0, dtype=pb.INT64), "BAD_DTYPE", "not INT64"),
    ],
)
def test_bad_pull_requests_are_refused(target, request_, code, words):
    _, stub, metadata, _ = target
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Pull(request_, metadata=metadata, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rejection(caught.value)[0] == code
    assert words in caught.value.details()


@pytest.mark.timeout(60)
def test_bad_status_request_is_refused(target):
    _, stub, metadata, _ = target
    with pytest.raises(grpc.RpcError) as caught:
        stub.Status(pb.StatusRequest(shard_id=9), metadata=metadata, timeout=10)
    assert rejection(caught.value)[0] == "BAD_SHARD"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "raw, words",
    [
        (b"\x08", "varint runs past the end"),
        (b"\x1a\xff\x01abc", "claims 255 bytes"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x12\x03\xff\xff\xff", "header does not parse"),
        (b"\x0a\x00", "seq is not a varint"),
    ],
)
def test_bytes_that_do_not_parse_are_refused_as_malformed(target, raw, words):
    shard, _, metadata, address = target
    with grpc.insecure_channel(address) as channel:
        push = channel.stream_unary(
            "/downpour.v1.ParameterServer/Push", lambda b: b, pb.PushReply.FromString
        )
        with pytest.raises(grpc.RpcError) as caught:
            push(iter([raw]), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    code, message = rejection(caught.value)
    assert code == "MALFORMED" and words in message
    assert shard.status()["pushes"] == 0
