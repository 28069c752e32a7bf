"""VectorOps over gRPC: Sandblaster's commands are checked like every other call."""

from __future__ import annotations

import grpc
import pytest
import torch

from downpour.errors import TransportError
from downpour.flat import shard_ranges
from downpour.server import ServerShard, SumPortions
from downpour.server import vectors as v
from downpour.transport import ParameterClient
from downpour.transport import downpour_pb2 as pb
from tests.integration.transport.test_validation import rejection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def sandblaster_shard(values, shard=None):
    return ServerShard(values, shard=shard, policy=SumPortions(), optimizer=lambda ps: torch.optim.SGD(ps, lr=1))


def test_dot_products_add_up_over_shards_and_pushes_sum_by_portion(serve, token):
    ranges = shard_ranges(10, 2)
    servers = [serve(sandblaster_shard(torch.arange(r.start, r.stop, dtype=torch.float32), r)) for r in ranges]
    with ParameterClient([s.address for s in servers], ranges, token) as client:
        values, versions = client.vector_ops_all([v.dot("x", "x"), v.copy("d", "x"), v.scale("x", 0.5)])
        assert values == [285.0] and versions == [1, 1]
        for portion in (0, 1, 1):
            client.push_all(0, versions, torch.ones(10), portion=portion)
        assert client.vector_ops_all([v.dot("g", "d")])[0] == [2 * 45.0]  # portion 1 counted once
        sent = client.bytes_received
        client.vector_ops_all([v.dot("g", "d")] * 10)
        assert client.bytes_received - sent < 400  # scalars come back, not vectors


FORGED = {
    "unknown op code": ([pb.VectorOp(code=42, dst="d")], "INVALID_ARGUMENT", "unknown vector op"),
    "missing operand": ([pb.VectorOp(code=pb.VectorOp.DOT, a="x", b="ghost")], "INVALID_ARGUMENT", "ghost"),
    "bad name": ([pb.VectorOp(code=pb.VectorOp.ZERO, dst="../etc")], "INVALID_ARGUMENT", "is not 1-32"),
    "infinite alpha": ([pb.VectorOp(code=pb.VectorOp.SCALE, dst="x", alpha=float("inf"))], "INVALID_ARGUMENT",
                       "alpha is inf"),
}


@pytest.mark.parametrize("name", sorted(FORGED))
def test_a_forged_vector_op_is_refused_and_changes_nothing(serve, token, stub, name):
    ops, code, words = FORGED[name]
    shard = sandblaster_shard(torch.ones(4))
    call = stub(serve(shard).address).VectorOps
    # A good op first: the whole call is refused, so even it does not happen.
    request = pb.VectorOpsRequest(shard_id=0, ops=[pb.VectorOp(code=pb.VectorOp.SCALE, dst="x", alpha=2.0), *ops])
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=(("downpour-token", token),), timeout=10)
    assert caught.value.code().name == code
    assert words in rejection(caught.value)[1]
    assert shard.version == 0 and shard.pull()[1].tolist() == [1.0] * 4


def test_vector_ops_need_the_token_and_the_right_shard(serve, token, stub, connect):
    shard = sandblaster_shard(torch.ones(4))
    address = serve(shard).address
    request = pb.VectorOpsRequest(shard_id=0, ops=[pb.VectorOp(code=pb.VectorOp.SCALE, dst="x", alpha=0.0)])
    with pytest.raises(grpc.RpcError) as caught:
        stub(address).VectorOps(request, metadata=(("downpour-token", "forged"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(TransportError, match="BAD_SHARD|not shard 3"):
        connect(address, shard_id=3).vector_ops([v.dot("x", "x")])
    assert shard.pull()[1].tolist() == [1.0] * 4
