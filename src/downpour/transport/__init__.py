"""The parameter-server transport: gRPC services, protobuf messages, chunked tensors.

The only gRPC code in downpour. Tensors travel as raw little-endian bytes in
chunks of about 1 MiB (client-streaming pushes, server-streaming pulls), or
in one unary call when they fit in one chunk, or, between a client and a
server on the same host, through a shared-memory segment with only headers
on gRPC. Every call carries the run's token, and every message is validated
before it reaches a shard, whichever way it came. Strategies and the cluster
use :func:`serve_shard`, :class:`ShardClient`, :class:`ParameterClient` and
:class:`Security`, and never see a gRPC type.

Example:
    >>> import torch
    >>> from downpour.server import ServerShard
    >>> token = new_token()
    >>> shard = ServerShard(torch.zeros(3), optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    >>> server = serve_shard(shard, token=token)
    >>> client = ShardClient(server.address, token, shard_id=0)
    >>> client.push(worker=0, version=0, update=torch.ones(3))
    PushResult(applied=True, dropped=False, staleness=0, version=1)
    >>> client.pull()
    (1, tensor([-1., -1., -1.]))
    >>> client.close(); server.stop()
"""

import secrets

from downpour.transport.parameters import ParameterClient
from downpour.transport.client import ShardClient
from downpour.transport.codec import CHUNK_BYTES
from downpour.transport.codec import MAX_MESSAGE_BYTES
from downpour.transport.protocol import InvalidUpdate
from downpour.transport.protocol import PushResult
from downpour.transport.protocol import Refused
from downpour.transport.protocol import Shard
from downpour.transport.protocol import UpdateKind
from downpour.transport.security import Security
from downpour.transport.service import ShardServer
from downpour.transport.service import ShardService
from downpour.transport.service import serve_shard
from downpour.transport.shared import SHARED_MIN_BYTES


def new_token() -> str:
    """A fresh random token for a run (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


__all__ = [
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "SHARED_MIN_BYTES",
    "InvalidUpdate",
    "ParameterClient",
    "PushResult",
    "Refused",
    "Security",
    "Shard",
    "ShardClient",
    "ShardServer",
    "ShardService",
    "UpdateKind",
    "new_token",
    "serve_shard",
]
