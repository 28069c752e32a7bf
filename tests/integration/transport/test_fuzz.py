"""Fuzzing every method of the ParameterServer service with forged and malformed messages.

One shard is served by a process of its own. Hypothesis, derandomized (every
run sends the same messages), plans 10,000 calls to the twelve methods of the
service, each of one of three families:

- forged: a message that parses but is invalid in a stated way (wrong shard,
  unknown enum values, wrong shapes, lengths, counts, sequence numbers and
  chunk order, NaN and infinite values, sparse indices out of range or out of
  order, corrupt compressed payloads, bogus or replayed shared-memory
  sessions, vector ops with bad names, codes or alphas), with the run's
  token. Each fault names the RejectCodes it may earn, and the refusal must
  give one of them;
- bad token: a message, valid or not, with no token, a wrong one, one a
  character off, or the right one where it does not count: BAD_TOKEN;
- raw bytes: a message of the method cut, flipped, spliced, given a bad tail
  or replaced by random bytes. Bytes the server's own parser refuses go with
  the token and must earn MALFORMED; bytes that still parse go with a bad
  token.

Hypothesis draws each call's plan (family, variant, faults, a seed), ten
calls an example; a generator seeded from the plan fills in the details,
boundary values often, so a loaded 2-core machine sends the 10,000 in well
under a minute. Then one message per method beyond gRPC's size limit, which
gRPC refuses itself (RESOURCE_EXHAUSTED).

Every other call must be refused with a status of :data:`REFUSALS` whose
details are the RejectCode and its message, as the ``Reject`` trailer carries
them. The forger holds the token and a shared-memory session of its own, so
the checks behind them are reached. Afterwards the server process is alive,
answers Status (version 0, nothing applied) and serves the parameters
bit-identical to what it served first, also through the session, into whose
segment every forged shared-memory push wrote its bytes.

A push's worker id and portion are any values (a shard keeps no list of
workers), as is a pull's ``newer_than``: they vary freely and never make a
call invalid by themselves.
"""

from __future__ import annotations

import json
import math
import random
import re
import select
import string
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from downpour.compress import MalformedPayload, code_indices
from downpour.compress.payloads import pack_bits
from downpour.server import ServerShard
from downpour.transport import codec, downpour_pb2_grpc, new_token, shared
from downpour.transport import downpour_pb2 as pb
from downpour.transport.payload import as_update, from_bytes, max_payload_bytes
from downpour.transport.service import MAX_REJECT_BYTES

pytestmark = pytest.mark.integration

T = TypeVar("T")

SIZE = shared.SHARED_MIN_BYTES // 4
"""Elements of the fuzzed shard: the fewest for which its server offers shared memory."""
SEGMENT_BYTES = 4 * SIZE
SEED = 20240601
MAX_WAIT = 0.005  # the server's longest wait for a version (pulls await one never reached)
CALL_TIMEOUT = 20.0
BATCH = 10  # calls per hypothesis example

QUOTAS = {  # calls per method, most where the checks are; multiples of BATCH
    "Push": 1300,
    "PushSmall": 800,
    "PushPull": 800,
    "PushShared": 800,
    "PushPullShared": 1000,
    "VectorOps": 1000,
    "PullShared": 700,
    "Pull": 700,
    "PullSmall": 700,
    "Status": 550,
    "Hello": 550,
    "Goodbye": 550,
    "Shutdown": 550,
}
MESSAGES = 10_000

# The status of a refusal, by RejectCode (INVALID_ARGUMENT for the others).
STATUS_OF = {
    "BAD_TOKEN": grpc.StatusCode.UNAUTHENTICATED,
    "STALE": grpc.StatusCode.FAILED_PRECONDITION,
    "TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, *STATUS_OF.values()}

U32 = 2**32 - 1
U64 = 2**64 - 1
I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
VALUES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2")}
INDICES = {pb.INT32: np.dtype("<i4"), pb.INT64: np.dtype("<i8")}
REQUESTS = {  # Push and PushSmall carry a PushChunk, which the server parses by hand
    "Pull": pb.PullRequest,
    "PullSmall": pb.PullRequest,
    "PushPull": pb.PushPullRequest,
    "Hello": pb.HelloRequest,
    "PullShared": pb.SharedPullRequest,
    "PushShared": pb.SharedPushRequest,
    "PushPullShared": pb.SharedPushPullRequest,
    "Goodbye": pb.GoodbyeRequest,
    "Status": pb.StatusRequest,
    "Shutdown": pb.ShutdownRequest,
    "VectorOps": pb.VectorOpsRequest,
}

Metadata = tuple[tuple[str, str | bytes], ...]
Codes = frozenset[str]


def _codes(*names: str) -> Codes:
    return frozenset(names)


def _union(table: dict[str, Codes], faults: Sequence[str]) -> Codes:
    return frozenset().union(*(table[fault] for fault in faults))


# -- the server, in a process of its own -------------------------------------------

_SERVER = f"""
import json, sys, torch
from downpour.server import ServerShard
from downpour.transport import serve_shard

torch.set_num_threads(1)
token, size, seed = sys.stdin.readline().split()
params = torch.randn(int(size), generator=torch.Generator().manual_seed(int(seed)))
shard = ServerShard(params, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
server = serve_shard(shard, token=token, max_wait={MAX_WAIT})
print(server.port, flush=True)
sys.stdin.readline()  # "stop", or the end of the test's pipe
print(json.dumps({{"shutdown_requested": server.shutdown_requested.is_set()}}), flush=True)
server.stop(grace=None)
"""


class ServerProcess:
    """A shard of ``SIZE`` seeded elements served by ``python -c _SERVER`` on a free port.

    The token goes through its stdin, not its command line; its stderr goes to ``log``.
    """

    def __init__(self, token: str, log: Path) -> None:
        self._log = log
        with log.open("w") as stderr:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._say(f"{token} {SIZE} {SEED}")
        self.address = f"127.0.0.1:{int(self._read(timeout=120))}"

    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> dict[str, Any]:
        """Ask it to stop; its last report, once it has exited with status 0."""
        self._say("stop")
        report = json.loads(self._read(timeout=30))
        assert self._process.wait(timeout=30) == 0, self.log()
        return report

    def kill(self) -> None:
        """Kill it if it still runs (after a failure), reap it and close its pipes."""
        if self.alive():
            self._process.kill()
        self._process.wait(timeout=30)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()

    def log(self) -> str:
        return self._log.read_text()

    def _say(self, line: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()

    def _read(self, timeout: float) -> str:
        stdout = self._process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"the server said nothing within {timeout} s:\n{self.log()}")
        return line


# -- plans and details -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What hypothesis draws for one call: the family, the method's variant, faults, a seed."""

    family: str  # "forged", "token" or "raw"
    variant: str
    faults: tuple[str, ...]
    seed: int


class Picker:
    """The details of one call, from generators seeded by its plan; boundary values often."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.numpy = np.random.default_rng(seed)

    def flip(self) -> bool:
        return self._random.random() < 0.5

    def choice(self, options: Sequence[T]) -> T:
        return options[self._random.randrange(len(options))]

    def integer(self, low: int, high: int, *, avoid: Sequence[int] = ()) -> int:
        """An int in ``[low, high]`` not in ``avoid``: an edge, a power-of-two magnitude, or any."""
        while True:
            roll = self._random.random()
            if roll < 0.3:
                value = self.choice([low, high, min(low + 1, high), max(high - 1, low)])
            elif roll < 0.65:
                span = self._random.randrange((high - low).bit_length() + 1)
                value = min(high, low + self._random.randrange(1 << span))
            else:
                value = self._random.randint(low, high)
            if value not in avoid:
                return value

    def binary(self, low: int, high: int) -> bytes:
        return self._random.randbytes(self.integer(low, high))

    def text(self, high: int) -> str:
        """Any characters but surrogates: ASCII, Latin-1, the rest of the BMP, beyond."""
        planes = [(0, 0x7F), (0x80, 0xFF), (0x100, 0xD7FF), (0xE000, 0x10FFFF)]
        return "".join(
            chr(self._random.randint(*self.choice(planes))) for _ in range(self.integer(0, high))
        )

    def values(self, count: int, dtype: int) -> np.ndarray:
        return self.numpy.standard_normal(count).astype(VALUES[dtype])

    def bits(self, count: int) -> bytes:
        return pack_bits(torch.from_numpy(self.numpy.random(count) < 0.5))

    def wrong_length(self, data: bytes) -> bytes:
        """``data`` cut short or run long."""
        if data and self.flip():
            return data[: self.integer(0, len(data) - 1)]
        return data + self.binary(1, 64)

    def bad_enum(self, valid: Sequence[int]) -> int:
        """An enum value outside ``valid``: a small one, a negative one, any int32."""
        return self.integer(-2, 8, avoid=valid) if self.flip() else self.integer(*I32, avoid=valid)


# -- forgeries -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionChoice:
    """The shared-memory session a request names, filled in when it is sent.

    ``key`` None: the test's own session, with a sequence number above its
    last (``fresh``: ``step`` + 1 above) or not (``step`` below, at least 0);
    else a made-up key, with ``step`` as the sequence number. ``reached``:
    whether the server looks the session up before it refuses the request.
    """

    key: bytes | None
    fresh: bool
    step: int
    reached: bool = True


SESSION_MODES = ("fresh", "used", "made_up")


def session_choice(pick: Picker, mode: str) -> SessionChoice:
    if mode == "made_up":
        return SessionChoice(pick.binary(0, 24), fresh=False, step=pick.integer(0, U64))
    return SessionChoice(None, fresh=mode == "fresh", step=pick.integer(0, 1000))


@dataclass(frozen=True)
class Forgery:
    """One call the server must refuse.

    ``messages``: the serialized request, or the chunks of Push's stream.
    ``reasons``: the RejectCodes the content's faults may earn; empty when the
    content alone would be a valid request (the token, the session or the
    bytes make it invalid). ``metadata``: None for the run's token.
    ``segment``: bytes for the start of the session's segment (PushShared).
    """

    method: str
    messages: tuple[bytes, ...]
    reasons: Codes
    what: str
    metadata: Metadata | None = None
    session: SessionChoice | None = None
    segment: bytes | None = None


Content = Callable[..., Forgery]
"""``content(pick, variant, faults, must_fault=...)``: a request of a method, faulty or maybe."""


def _chosen(pick: Picker, faults: Sequence[str], possible: Sequence[str], must: bool) -> list[str]:
    """The faults of ``faults`` that apply, or one that does if there must be one."""
    chosen = [fault for fault in faults if fault in possible]
    return chosen or ([pick.choice(possible)] if must else [])


# -- pulls ---------------------------------------------------------------------------

PULL_FAULTS = {
    "shard": _codes("BAD_SHARD"),
    "dtype": _codes("BAD_DTYPE"),
    "average": _codes("BAD_REQUEST"),  # the shard keeps no moving average
    "wait": _codes("TIMEOUT"),  # a version the shard never reaches
}


def pull_request(
    pick: Picker,
    faults: Sequence[str],
    *,
    must_fault: bool,
    possible: Sequence[str] = tuple(PULL_FAULTS),
) -> tuple[pb.PullRequest, Codes, str]:
    """A PullRequest with the ``faults`` that are ``possible``; its codes and a description."""
    faults = _chosen(pick, faults, possible, must_fault)
    request = pb.PullRequest(shard_id=0, dtype=pick.choice([0, pb.FLOAT32, pb.FLOAT16]))
    if pick.flip():
        request.newer_than = pick.integer(*I64)
    if "shard" in faults:
        request.shard_id = pick.integer(1, U32)
    if "dtype" in faults:
        request.dtype = pick.bad_enum([0, pb.FLOAT32, pb.FLOAT16])
    if "average" in faults:
        request.average = True
    if "wait" in faults:
        request.wait_version = pick.integer(1, I64[1])
    elif pick.flip():
        request.wait_version = pick.integer(I64[0], 0)  # reached already: harmless
    return request, _union(PULL_FAULTS, faults), ",".join(faults) or "-"


def pulls(method: str) -> Content:
    def content(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
        request, reasons, what = pull_request(pick, faults, must_fault=must_fault)
        return Forgery(method, (request.SerializeToString(),), reasons, f"{method}[{what}]")

    return content


def shared_pull(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    session = session_choice(pick, variant)
    # Only a fresh sequence number of the real session leaves the request to be checked.
    needed = must_fault and variant == "fresh"
    request, reasons, what = pull_request(pick, faults, must_fault=needed)
    message = pb.SharedPullRequest()
    if needed or reasons or pick.flip():  # else none: a pull of the parameters
        message.request.CopyFrom(request)
    what = f"PullShared[{what}; {session}]"
    return Forgery("PullShared", (message.SerializeToString(),), reasons, what, session=session)


# -- compressed payloads ---------------------------------------------------------

CORRUPTIONS = {
    "dense": ("dtype", "values", "non_finite"),
    "sparse": ("size", "nnz", "dtype", "values", "non_finite", "no_indices", "raw", "deflated"),
    "signs": ("size", "nnz", "tau", "bits", "no_indices", "raw", "deflated"),
    "onebit": ("size", "chunk", "dtype", "bits", "scales", "non_finite"),
}
BLIND = ("garbage", "truncate", "flip", "no_kind")  # may miss: then "no_kind" stands in
NO_KIND = b"\x48\x01"  # a Compressed of one unknown field


def _decodes(data: bytes) -> bool:
    """Whether the server's decoder takes ``data`` as a payload for the shard."""
    try:
        from_bytes(data, expected_size=SIZE)
    except MalformedPayload:
        return False
    return True


def compressed_payload(pick: Picker, *, corrupt: bool, shared: bool) -> bytes:
    """A serialized ``Compressed`` for the shard, broken if ``corrupt``.

    Fits the shared segment if ``shared``; never empty nor beyond
    :func:`max_payload_bytes`, so that only its content is wrong.
    """
    kind = pick.choice(tuple(CORRUPTIONS))
    message = pb.Compressed()
    positions = np.zeros(0, "<i4")
    if kind == "dense":
        dtype = pb.FLOAT16 if shared else pick.choice([pb.FLOAT32, pb.FLOAT16])
        message.dense.dtype = dtype
        message.dense.values = pick.values(SIZE, dtype).tobytes()
    elif kind in ("sparse", "signs"):
        part = getattr(message, kind)
        nnz = pick.integer(2, 48)
        positions = np.sort(pick.numpy.choice(SIZE, nnz, replace=False)).astype("<i4")
        part.size, part.nnz = SIZE, nnz
        if pick.flip():
            part.indices.raw = positions.tobytes()
        else:
            part.indices.deflated = code_indices(torch.from_numpy(positions)).data
        if kind == "sparse":
            part.dtype = pick.choice([pb.FLOAT32, pb.FLOAT16])
            part.values = pick.values(nnz, part.dtype).tobytes()
        else:
            part.tau = float(pick.numpy.uniform(1e-6, 1e3))
            part.negative = pick.bits(nnz)
    else:
        onebit = message.onebit
        onebit.size, onebit.dtype = SIZE, pick.choice([pb.FLOAT32, pb.FLOAT16])
        onebit.chunk = pick.integer(3, U32)  # beyond the vector: one chunk of it
        count = -(-SIZE // onebit.chunk)
        onebit.bits = pick.bits(SIZE)
        onebit.positive = np.abs(pick.values(count, onebit.dtype)).tobytes()
        onebit.negative = (-np.abs(pick.values(count, onebit.dtype))).tobytes()
    data = message.SerializeToString()
    assert _decodes(data), f"a {kind} payload the fuzzer made to be valid is not"
    if not corrupt:
        return data
    how = pick.choice(CORRUPTIONS[kind] + BLIND)
    if how in BLIND:
        broken = _blindly_broken(pick, data, how)
        return broken if not _decodes(broken) else NO_KIND
    broken_message = pb.Compressed()
    broken_message.CopyFrom(message)
    _break(pick, getattr(broken_message, kind), kind, how, positions)
    broken = broken_message.SerializeToString()
    assert not _decodes(broken), f"breaking the {how} of a {kind} payload left it valid"
    return broken


def _blindly_broken(pick: Picker, data: bytes, how: str) -> bytes:
    if how == "garbage":
        return pick.binary(1, 64)
    if how == "truncate":
        return data[: pick.integer(1, len(data) - 1)]
    if how == "flip":
        at = pick.integer(0, len(data) - 1)
        return data[:at] + bytes([data[at] ^ pick.integer(1, 255)]) + data[at + 1 :]
    return NO_KIND + pick.binary(0, 8)


def _break(pick: Picker, part, kind: str, how: str, positions: np.ndarray) -> None:
    """Make one field of ``part``, the ``kind`` of a Compressed, wrong as ``how`` says."""
    nnz = len(positions)
    if how == "size":
        part.size = pick.integer(0, U64, avoid=[SIZE])
    elif how == "nnz":
        part.nnz = pick.integer(0, U64, avoid=[nnz])
    elif how == "dtype":
        part.dtype = pick.bad_enum([pb.FLOAT32, pb.FLOAT16])
    elif how == "values":
        part.values = pick.wrong_length(part.values)
    elif how == "non_finite":
        field = "values" if kind != "onebit" else pick.choice(["positive", "negative"])
        array = np.frombuffer(getattr(part, field), VALUES[part.dtype]).copy()
        array[pick.integer(0, len(array) - 1)] = pick.choice([np.nan, np.inf, -np.inf])
        setattr(part, field, array.tobytes())
    elif how == "no_indices":
        part.ClearField("indices")
    elif how == "raw":
        bad, at = positions.copy(), pick.integer(0, nnz - 2)
        way = pick.choice(["range", "negative", "repeat", "order", "count"])
        if way == "range":
            bad[-1] = pick.integer(SIZE, I32[1])
        elif way == "negative":
            bad[0] = pick.integer(I32[0], -1)
        elif way == "repeat":
            bad[at + 1] = bad[at]
        elif way == "order":
            bad[[at, at + 1]] = bad[[at + 1, at]]
        else:
            bad = bad[:-1]
        part.indices.raw = bad.tobytes()
    elif how == "deflated":
        while True:  # a deflate bomb, or garbage that is no zlib stream of these indices
            data = (
                zlib.compress(b"\x01" * pick.integer(1, 1 << 20))
                if pick.flip()
                else pick.binary(0, 32)
            )
            if not _indices_decode(data, nnz):
                break
        part.indices.deflated = data
    elif how == "tau":
        part.tau = pick.choice([0.0, -1.0, -3.0e38, math.nan, math.inf, -math.inf])
    elif how == "bits":
        field, count = ("negative", nnz) if kind == "signs" else ("bits", SIZE)
        data = getattr(part, field)
        if count % 8 and pick.flip():  # a padding bit set
            data = data[:-1] + bytes([data[-1] | 0x80])
        else:
            data = pick.wrong_length(data)
        setattr(part, field, data)
    elif how == "chunk":
        part.chunk = 0
    else:  # scales
        field = pick.choice(["positive", "negative"])
        setattr(part, field, pick.wrong_length(getattr(part, field)))


def _indices_decode(data: bytes, nnz: int) -> bool:
    message = pb.Compressed()
    message.sparse.size, message.sparse.nnz, message.sparse.dtype = SIZE, nnz, pb.FLOAT32
    message.sparse.indices.deflated = data
    message.sparse.values = b"\0" * 4 * nnz
    return _decodes(message.SerializeToString())


# -- pushes ----------------------------------------------------------------------

PUSH_FAULTS = {
    "shard": _codes("BAD_SHARD"),
    "kind": _codes("BAD_KIND"),
    "encoding": _codes("BAD_ENCODING"),
    "shape": _codes("BAD_LENGTH"),
    "version": _codes("BAD_VERSION"),  # the shard never leaves version 0
    "no_chunks": _codes("BAD_CHUNK_COUNT"),
    "dtype": _codes("BAD_DTYPE"),
    "index_dtype": _codes("BAD_DTYPE"),
    "nnz": _codes("BAD_LENGTH"),
    "length": _codes("BAD_LENGTH"),  # of the values, or the indices, or nnz: one only
    "indices_on_dense": _codes("BAD_ENCODING"),
    "non_finite": _codes("NON_FINITE"),
    "index_range": _codes("BAD_INDEX"),
    "index_order": _codes("BAD_INDEX"),
    "payload_bytes": _codes("BAD_LENGTH"),
    "payload": _codes("BAD_PAYLOAD"),
    "overflow": _codes("BAD_LENGTH"),  # more bytes than the shared segment holds
}
CHUNK_FAULTS = {  # at most one per push: two could cancel out
    "chunk_count": _codes("BAD_CHUNK_COUNT"),
    "seq": _codes("BAD_CHUNK_ORDER"),
    "no_header": _codes("BAD_HEADER"),
    "drop": _codes("BAD_HEADER", "BAD_CHUNK_ORDER", "BAD_CHUNK_COUNT"),
    "duplicate": _codes("BAD_HEADER", "BAD_CHUNK_ORDER", "BAD_CHUNK_COUNT"),
    "extra": _codes("BAD_CHUNK_COUNT"),
    "second_header": _codes("BAD_HEADER"),
    "swap": _codes("BAD_HEADER", "BAD_CHUNK_ORDER"),
    "empty": _codes("BAD_CHUNK_COUNT"),
}
# How a push travels: chunks in a stream (Push), one chunk (PushSmall, PushPull), or a
# header whose bytes lie in the shared segment (PushShared).
CHUNK_FAULTS_OF = {
    "stream": tuple(CHUNK_FAULTS),
    "unary": ("chunk_count", "seq", "no_header"),
    "shared": ("chunk_count", "no_header"),
}
ENCODINGS = {"dense": pb.DENSE, "sparse": pb.SPARSE, "compressed": pb.COMPRESSED}


def _push_faults(encoding: str, way: str) -> list[str]:
    faults = ["shard", "kind", "encoding", "shape", "version", "no_chunks"]
    if encoding != "compressed":
        faults += ["dtype", "non_finite"]
    if encoding == "sparse":
        faults += ["index_dtype", "nnz", "index_range", "index_order"]
    if encoding == "compressed":
        faults += ["payload_bytes", "payload"]
    if way != "shared":  # a shared push's lengths are its header's: only too many can be wrong
        faults += ["length", *(["indices_on_dense"] if encoding == "dense" else [])]
    elif encoding != "dense":
        faults.append("overflow")
    return faults


@dataclass(frozen=True)
class PushParts:
    """A push before it is cut into chunks: header, values and indices, what is wrong."""

    header: pb.PushHeader
    values: bytes
    indices: bytes
    chunk_fault: str | None
    reasons: Codes
    what: str


def push_parts(
    pick: Picker, encoding: str, faults: Sequence[str], *, way: str, must_fault: bool
) -> PushParts:
    """A dense, sparse or compressed push with the ``faults`` that apply to it.

    Its chunk fault (the first of ``faults`` that ``way`` has) is only named
    here; :func:`push_chunks` applies it.
    """
    chunk_fault = next((fault for fault in faults if fault in CHUNK_FAULTS_OF[way]), None)
    faults = _chosen(pick, faults, _push_faults(encoding, way), must_fault and not chunk_fault)
    dtype = pick.choice([pb.FLOAT32, pb.FLOAT16])
    header = pb.PushHeader(
        shard_id=0,
        worker=pick.integer(0, U32),
        version=0,
        kind=pick.choice([pb.GRADIENT, pb.DELTA]),
        encoding=ENCODINGS[encoding],
        dtype=dtype,
        shape=[SIZE],
        num_chunks=1,
    )
    if pick.flip():
        header.portion = pick.integer(0, U64)
    indices = np.zeros(0, np.int64)
    if encoding == "dense":
        values = pick.values(SIZE, dtype)
    elif encoding == "sparse":
        header.index_dtype = pick.choice([pb.INT32, pb.INT64])
        least = (
            2 if "index_order" in faults else int(bool({"index_range", "non_finite"} & {*faults}))
        )
        header.nnz = pick.integer(least, 48)
        indices = np.sort(pick.numpy.choice(SIZE, header.nnz, replace=False))
        values = pick.values(header.nnz, dtype)
    else:
        payload = compressed_payload(pick, corrupt="payload" in faults, shared=way == "shared")
        header.payload_bytes = len(payload)
        values = np.frombuffer(payload, np.uint8)

    if "non_finite" in faults:
        values = values.copy()
        values[pick.integer(0, len(values) - 1)] = pick.choice([np.nan, np.inf, -np.inf])
    if "index_order" in faults:
        at = pick.integer(0, len(indices) - 2)
        if pick.flip():
            indices[at + 1] = indices[at]
        else:
            indices[[at, at + 1]] = indices[[at + 1, at]]
    index_dtype = INDICES.get(header.index_dtype, np.dtype("<i8"))
    if "index_range" in faults:
        high = int(np.iinfo(index_dtype).max)
        if pick.flip():
            indices[-1] = pick.integer(SIZE, high)
        else:
            indices[0] = pick.integer(-high - 1, -1)
    value_bytes = values.tobytes()
    index_bytes = indices.astype(index_dtype).tobytes() if encoding == "sparse" else b""

    if "shard" in faults:
        header.shard_id = pick.integer(1, U32)
    if "kind" in faults:
        header.kind = pick.bad_enum([pb.GRADIENT, pb.DELTA])
    if "encoding" in faults:
        header.encoding = pick.bad_enum(list(ENCODINGS.values()))
    if "shape" in faults:
        del header.shape[:]
        header.shape.extend(bad_shape(pick))
    if "version" in faults:
        header.version = pick.integer(1, I64[1]) if pick.flip() else pick.integer(I64[0], -1)
    if "dtype" in faults:
        header.dtype = pick.bad_enum([pb.FLOAT32, pb.FLOAT16])
    if "index_dtype" in faults:
        header.index_dtype = pick.bad_enum([pb.INT32, pb.INT64])
    if "nnz" in faults:
        header.nnz = pick.integer(SIZE + 1, U64)
    if "payload_bytes" in faults:
        header.payload_bytes = 0 if pick.flip() else pick.integer(max_payload_bytes(SIZE) + 1, U64)
    if "overflow" in faults:
        if encoding == "sparse":
            entry = VALUES[dtype].itemsize + index_dtype.itemsize
            header.nnz = pick.integer(-(-(SEGMENT_BYTES + 1) // entry), SIZE)
        else:
            header.payload_bytes = pick.integer(SEGMENT_BYTES + 1, max_payload_bytes(SIZE))
    if "length" in faults:
        which = pick.choice(["values", "indices", "nnz"] if encoding == "sparse" else ["values"])
        if which == "nnz":
            header.nnz = pick.integer(0, SIZE, avoid=[len(indices)])
        elif which == "values":
            value_bytes = pick.wrong_length(value_bytes)
        else:
            index_bytes = pick.wrong_length(index_bytes)
    if "indices_on_dense" in faults:
        index_bytes = pick.binary(1, 64)
    if "no_chunks" in faults:
        header.num_chunks = 0

    reasons = _union(PUSH_FAULTS, faults)
    if chunk_fault is not None:
        reasons |= CHUNK_FAULTS[chunk_fault]
    what = f"{encoding}: {','.join(faults) or '-'}; {chunk_fault or '-'}"
    return PushParts(header, value_bytes, index_bytes, chunk_fault, reasons, what)


def bad_shape(pick: Picker) -> list[int]:
    """A shape other than ``[SIZE]``: off by some, 2-D, negative, empty, thousands long."""
    while True:
        way = pick.choice(["any", "off", "2-D", "long"])
        if way == "any":
            shape = [pick.integer(*I64) for _ in range(pick.integer(0, 6))]
        elif way == "off":
            shape = [SIZE + pick.integer(-2 * SIZE, SIZE)]
        elif way == "2-D":
            rows = pick.integer(1, SIZE)
            shape = [rows, SIZE // rows]
        else:
            shape = [SIZE] * pick.integer(1_000, 5_000)  # quoted in the refusal: clipped
        if shape != [SIZE]:
            return shape


def push_chunks(pick: Picker, parts: PushParts, *, way: str) -> list[pb.PushChunk]:
    """The chunks of ``parts`` (one unless ``way`` is "stream"), its chunk fault applied."""
    fault = parts.chunk_fault
    count = pick.integer(2 if fault == "swap" else 1, 4) if way == "stream" else 1
    header = pb.PushHeader()
    header.CopyFrom(parts.header)
    if header.num_chunks:  # else the no_chunks fault
        header.num_chunks = count
    cuts = [
        [0, *sorted(pick.integer(0, len(data)) for _ in range(count - 1)), len(data)]
        for data in (parts.values, parts.indices)
    ]
    chunks = [
        pb.PushChunk(
            seq=seq,
            values=parts.values[cuts[0][seq] : cuts[0][seq + 1]],
            indices=parts.indices[cuts[1][seq] : cuts[1][seq + 1]],
        )
        for seq in range(count)
    ]
    chunks[0].header.CopyFrom(header)
    at = pick.integer(0, count - 1)
    if fault == "chunk_count":
        chunks[0].header.num_chunks = pick.integer(1, U32, avoid=[count])
    elif fault == "seq":
        chunks[at].seq = pick.integer(0, U32, avoid=[at])
    elif fault == "no_header":
        chunks[0].ClearField("header")
    elif fault == "drop":
        del chunks[at]
    elif fault == "duplicate":
        chunks.insert(at + 1, pb.PushChunk.FromString(chunks[at].SerializeToString()))
    elif fault == "extra":
        chunks.append(pb.PushChunk(seq=count, values=pick.binary(0, 16)))
    elif fault == "second_header":
        if count > 1:
            chunks[pick.integer(1, count - 1)].header.CopyFrom(header)
        else:
            chunks.append(pb.PushChunk(seq=1, header=header))
    elif fault == "swap":
        at = min(at, count - 2)
        chunks[at], chunks[at + 1] = chunks[at + 1], chunks[at]
    elif fault == "empty":
        chunks = []
    return chunks


def stream_push(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    parts = push_parts(pick, variant, faults, way="stream", must_fault=must_fault)
    chunks = push_chunks(pick, parts, way="stream")
    messages = tuple(chunk.SerializeToString() for chunk in chunks)
    return Forgery("Push", messages, parts.reasons, f"Push[{parts.what}; {len(chunks)} chunks]")


def small_push(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    parts = push_parts(pick, variant, faults, way="unary", must_fault=must_fault)
    (chunk,) = push_chunks(pick, parts, way="unary")
    what = f"PushSmall[{parts.what}]"
    return Forgery("PushSmall", (chunk.SerializeToString(),), parts.reasons, what)


PUSH_PULL_FAULTS = ("pull_shard", "pull_dtype", "pull_average")  # checked before the push


def push_pull(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    """A push and a pull in one request: the push forged, or the pull (refused before the push)."""
    pull_faults = [fault.removeprefix("pull_") for fault in faults if fault in PUSH_PULL_FAULTS]
    push_forged = must_fault and (not pull_faults or pick.flip())
    parts = push_parts(pick, variant, faults, way="unary", must_fault=push_forged)
    (chunk,) = push_chunks(pick, parts, way="unary")
    request, pull_reasons, pull_what = pull_request(
        pick,
        pull_faults,
        must_fault=must_fault and not push_forged,
        possible=("shard", "dtype", "average"),
    )
    message = pb.PushPullRequest(pull=request)
    if parts.chunk_fault != "no_header" or pick.flip():  # else no push at all
        message.push.CopyFrom(chunk)
    what = f"PushPull[push {parts.what}; pull {pull_what}]"
    return Forgery("PushPull", (message.SerializeToString(),), parts.reasons | pull_reasons, what)


def shared_push(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    session = session_choice(pick, pick.choice(("fresh", "fresh", "used", "made_up")))
    needed = must_fault and session.fresh
    parts = push_parts(pick, variant, faults, way="shared", must_fault=needed)
    message = pb.SharedPushRequest()
    if parts.chunk_fault == "no_header":
        session = replace(session, reached=False)  # refused before its session is looked up
    else:
        message.header.CopyFrom(parts.header)
        if parts.chunk_fault == "chunk_count":
            message.header.num_chunks = pick.integer(2, U32)
    return Forgery(
        "PushShared",
        (message.SerializeToString(),),
        parts.reasons,
        f"PushShared[{parts.what}; {session}]",
        session=session,
        segment=parts.values + parts.indices,
    )


def shared_push_pull(
    pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool
) -> Forgery:
    """A push from the segment and a pull into it: the push forged, or the pull (refused before
    the session is looked up, so its sequence number is not taken)."""
    session = session_choice(pick, pick.choice(("fresh", "fresh", "used", "made_up")))
    needed = must_fault and session.fresh
    pull_faults = [fault.removeprefix("pull_") for fault in faults if fault in PUSH_PULL_FAULTS]
    push_forged = needed and (not pull_faults or pick.flip())
    parts = push_parts(pick, variant, faults, way="shared", must_fault=push_forged)
    request, pull_reasons, pull_what = pull_request(
        pick,
        pull_faults,
        must_fault=needed and not push_forged,
        possible=("shard", "dtype", "average"),
    )
    message = pb.SharedPushPullRequest(pull=request)
    if parts.chunk_fault == "no_header" or pull_reasons:
        session = replace(session, reached=False)  # refused before its session is looked up
    if parts.chunk_fault != "no_header":
        message.push.CopyFrom(parts.header)
        if parts.chunk_fault == "chunk_count":
            message.push.num_chunks = pick.integer(2, U32)
    return Forgery(
        "PushPullShared",
        (message.SerializeToString(),),
        parts.reasons | pull_reasons,
        f"PushPullShared[push {parts.what}; pull {pull_what}; {session}]",
        session=session,
        segment=parts.values + parts.indices,
    )


# -- vector ops ------------------------------------------------------------------

NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # what downpour.server.vectors takes
PLAIN_NAMES = ("x", "d", "e")  # the ops that mean well use only these
OPERANDS = {  # the fields each code reads
    pb.VectorOp.ZERO: ("dst",),
    pb.VectorOp.COPY: ("dst", "a"),
    pb.VectorOp.SCALE: ("dst",),
    pb.VectorOp.AXPY: ("dst", "a"),
    pb.VectorOp.DOT: ("a", "b"),
    pb.VectorOp.DROP: ("dst",),
}
VECTOR_FAULTS = {
    "shard": _codes("BAD_SHARD"),
    "code": _codes("BAD_REQUEST"),
    "name": _codes("BAD_REQUEST"),
    "alpha": _codes("NON_FINITE"),  # NaN, infinite, or beyond float32
    "missing": _codes("BAD_REQUEST"),  # reads a vector the shard does not have
    "drop": _codes("BAD_REQUEST"),  # drops x or g
    "ops": _codes("BAD_REQUEST"),  # more than MAX_OPS
    "vectors": _codes("BAD_REQUEST"),  # would leave more than MAX_VECTORS
}


def bad_name(pick: Picker) -> str:
    while True:
        way = pick.choice(["known", "any", "long", "wide"])
        if way == "known":
            name = pick.choice(["", "X", "1x", "_x", "x-y", "x y", "x.y", "x\n", "é", "a" * 33])
        elif way == "any":
            name = pick.text(40)
        elif way == "long":
            name = "v" * pick.integer(33, 20_000)  # quoted in the refusal: clipped
        else:
            name = "é" * pick.integer(1, 4_000)  # and percent-encoded in its status
        if not NAME.fullmatch(name):
            return name


def bad_alpha(pick: Picker) -> float:
    """NaN, infinite, or a finite double beyond float32's range."""
    if pick.flip():
        return pick.choice([math.nan, math.inf, -math.inf])
    beyond = float(np.exp(pick.numpy.uniform(math.log(3.5e38), math.log(1.7e308))))
    return pick.choice([beyond, -beyond])


def faulty_ops(pick: Picker, fault: str) -> list[pb.VectorOp]:
    """Ops of which at least one is refused for ``fault``."""
    op = pb.VectorOp
    if fault == "code":
        return [op(code=pick.bad_enum(list(OPERANDS)), dst="d", a="x", b="x")]
    if fault == "name":
        code = pick.choice(list(OPERANDS))
        bad = op(code=code, dst="x", a="x", b="x", alpha=1.0)
        setattr(bad, pick.choice(OPERANDS[code]), bad_name(pick))
        return [bad]
    if fault == "alpha":
        code = pick.choice([op.SCALE, op.AXPY])
        return [op(code=code, dst="x", a="x", alpha=bad_alpha(pick))]
    if fault == "missing":
        name = pick.choice(["missing", "g"])  # no batch gradient under this policy
        return [
            pick.choice(
                [
                    op(code=op.COPY, dst="d", a=name),
                    op(code=op.SCALE, dst=name, alpha=2.0),
                    op(code=op.AXPY, dst="x", a=name, alpha=1.0),
                    op(code=op.AXPY, dst=name, a="x", alpha=1.0),
                    op(code=op.DOT, a=name, b="x"),
                    op(code=op.DOT, a="x", b=name),
                    op(code=op.DROP, dst=name),
                ]
            )
        ]
    if fault == "drop":
        return [op(code=op.DROP, dst=pick.choice(["x", "g"]))]
    if fault == "ops":
        return [op(code=op.ZERO, dst="d")] * pick.integer(1025, 1100)
    return [op(code=op.ZERO, dst=f"v{i}") for i in range(pick.integer(65, 80))]


def vector_ops(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    """Ops that mean well around faulty ones; SCALE of x by 2, say, must not happen either."""
    faults = _chosen(pick, faults, tuple(VECTOR_FAULTS), must_fault)
    ops = [
        pb.VectorOp(
            code=pick.integer(1, 6),
            dst=pick.choice(PLAIN_NAMES),
            a=pick.choice(PLAIN_NAMES),
            b=pick.choice(PLAIN_NAMES) if pick.flip() else pick.text(6),
            alpha=float(pick.numpy.uniform(-1e3, 1e3)),
        )
        for _ in range(pick.integer(0, 5))
    ]
    plain = bool(ops)
    for fault in faults:
        if fault != "shard":
            at = pick.integer(0, len(ops))
            ops[at:at] = faulty_ops(pick, fault)
    request = pb.VectorOpsRequest(shard_id=0, ops=ops)
    if "shard" in faults:
        request.shard_id = pick.integer(1, U32)
    # Ops that mean well may be refused too (a vector read before it is made).
    reasons = _union(VECTOR_FAULTS, faults) | (_codes("BAD_REQUEST") if plain else frozenset())
    what = f"VectorOps[{','.join(faults) or '-'}; {len(ops)} ops]"
    return Forgery("VectorOps", (request.SerializeToString(),), reasons, what)


# -- the rest --------------------------------------------------------------------


def hello(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    shard = pick.integer(1, U32) if must_fault or faults else 0
    request = pb.HelloRequest(shard_id=shard, shared_memory=pick.flip())
    reasons = _codes("BAD_SHARD") if shard else frozenset()
    return Forgery("Hello", (request.SerializeToString(),), reasons, f"Hello[shard {shard}]")


def status(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    shard = pick.integer(1, U32) if must_fault or faults else 0
    request = pb.StatusRequest(shard_id=shard).SerializeToString()
    reasons = _codes("BAD_SHARD") if shard else frozenset()
    return Forgery("Status", (request,), reasons, f"Status[shard {shard}]")


def goodbye(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    """Valid with the token, whatever the session (ending an ended one is no error)."""
    assert not must_fault, "with the token, every Goodbye that parses is valid"
    session = session_choice(pick, variant)
    return Forgery("Goodbye", (b"",), frozenset(), f"Goodbye[{session}]", session=session)


def shutdown(pick: Picker, variant: str, faults: Sequence[str], *, must_fault: bool) -> Forgery:
    """Valid with the token, whatever the reason."""
    assert not must_fault, "with the token, every Shutdown that parses is valid"
    reason = pick.text(64)
    request = pb.ShutdownRequest(reason=reason).SerializeToString()
    return Forgery("Shutdown", (request,), frozenset(), f"Shutdown[{reason!r}]")


# The faults behind the header checks, three times as likely, so that the checks of the
# values, indices and payloads (which a header fault would mask) are reached as often.
DEEP_PUSH_FAULTS = ("length", "non_finite", "index_range", "index_order", "payload", "overflow")
PUSH_VOCABULARY = (*PUSH_FAULTS, *CHUNK_FAULTS, *DEEP_PUSH_FAULTS, *DEEP_PUSH_FAULTS)
METHODS: dict[str, tuple[Content, tuple[str, ...], tuple[str, ...]]] = {
    # method: (its content, its variants, the faults hypothesis picks from)
    "Push": (stream_push, tuple(ENCODINGS), PUSH_VOCABULARY),
    "PushSmall": (small_push, tuple(ENCODINGS), PUSH_VOCABULARY),
    "PushPull": (push_pull, tuple(ENCODINGS), (*PUSH_VOCABULARY, *PUSH_PULL_FAULTS)),
    "PushShared": (shared_push, tuple(ENCODINGS), PUSH_VOCABULARY),
    "PushPullShared": (
        shared_push_pull, tuple(ENCODINGS), (*PUSH_VOCABULARY, *PUSH_PULL_FAULTS)
    ),
    "VectorOps": (vector_ops, ("-",), tuple(VECTOR_FAULTS)),
    "PullShared": (shared_pull, SESSION_MODES, tuple(PULL_FAULTS)),
    "Pull": (pulls("Pull"), ("-",), tuple(PULL_FAULTS)),
    "PullSmall": (pulls("PullSmall"), ("-",), tuple(PULL_FAULTS)),
    "Status": (status, ("-",), ("shard",)),
    "Hello": (hello, ("-",), ("shard",)),
    "Goodbye": (goodbye, SESSION_MODES, ()),
    "Shutdown": (shutdown, ("-",), ()),
}
UNFORGEABLE = {"Goodbye", "Shutdown"}  # with the token, refused only if they do not parse

TOKEN_CHARS = string.ascii_letters + string.digits + "-_"


def bad_metadata(pick: Picker, token: str) -> Metadata:
    """No token, a wrong one, one a character off, or the right one where it does not count."""
    key = codec.TOKEN_KEY
    way = pick.choice(["none", "wrong", "near", "one_off", "first_wrong", "other_key", "binary"])
    if way == "none":
        return ()
    if way == "other_key":
        return (("authorization", token),)
    if way == "binary":
        return ((key + "-bin", token.encode()),)
    if way == "near":
        wrong = pick.choice([token[:-1], token[1:], token + "A", token.swapcase(), token * 2, ""])
    elif way == "one_off":
        at = pick.integer(0, len(token) - 1)
        wrong = token[:at] + pick.choice(TOKEN_CHARS.replace(token[at], "")) + token[at + 1 :]
    else:
        wrong = "".join(pick.choice(TOKEN_CHARS) for _ in range(pick.integer(0, 64)))
    assert wrong != token
    if way == "first_wrong":
        return ((key, wrong), (key, token))  # the first one counts
    return ((key, wrong),)


BAD_TAILS = (
    b"\x00",  # field 0
    b"\x07",  # wire type 7
    b"\x0e\x01",  # wire type 6
    b"\x0b",  # a group that never ends
    b"\x0c",  # the end of a group never started
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
    b"\x1a\xff\xff\xff\x0f",  # a field claiming 4 GiB
    b"\x12",  # a tag with nothing after it
    b"\x80",  # half a tag
)
BAD_UTF8 = {  # a string field with bytes that are not UTF-8
    "Shutdown": b"\x0a\x02\xc3\x28",
    "VectorOps": b"\x12\x04\x12\x02\xff\xfe",
}


def _malformed(method: str, data: bytes) -> bool:
    """Whether the server's own parser refuses ``data`` as the request of ``method``."""
    if method in ("Push", "PushSmall"):
        parsed = codec.parse_push_chunk(data)
    else:
        parsed = codec.tolerant(REQUESTS[method].FromString)(data)
    return isinstance(parsed, codec.Malformed)


def raw_bytes(method: str, pick: Picker, base: Forgery, token: str) -> Forgery:
    """``base`` broken at the byte level, or replaced by bytes of no request at all."""
    messages = list(base.messages)
    if base.session is not None:  # some session, as bytes
        session = pb.SharedPullRequest(session=pick.binary(0, 24), seq=pick.integer(0, U64))
        messages[0] += session.SerializeToString()
    at = pick.integer(0, len(messages)) if method == "Push" else 0
    original = messages[at] if at < len(messages) else b""
    how = pick.choice(["random", "truncate", "flip", "insert", "tail", "utf8"])
    if how == "random" or (not original and how in ("truncate", "flip")):
        broken = pick.binary(1, 64)
    elif how == "truncate":
        broken = original[: pick.integer(0, len(original) - 1)]
    elif how == "flip":
        i = pick.integer(0, len(original) - 1)
        broken = original[:i] + bytes([original[i] ^ pick.integer(1, 255)]) + original[i + 1 :]
    elif how == "insert":
        i = pick.integer(0, len(original))
        broken = original[:i] + pick.binary(1, 8) + original[i:]
    elif how == "utf8" and method in BAD_UTF8:
        broken = original + BAD_UTF8[method]
    else:  # a bad tail, also for utf8 where the request has no string
        broken = original + pick.choice(BAD_TAILS)
    messages[at : at + 1] = [broken]
    what = f"{method}[{how} bytes of {base.what}]"
    if any(_malformed(method, message) for message in messages):
        # Push reads its stream up to the first bad chunk: those before may be refused.
        reasons = _codes("MALFORMED") | (base.reasons if method == "Push" else frozenset())
        return Forgery(method, tuple(messages), reasons, what)
    metadata = bad_metadata(pick, token)
    return Forgery(method, tuple(messages), frozenset(), f"{what}, parsed", metadata=metadata)


def plans(method: str) -> st.SearchStrategy[Plan]:
    """What hypothesis chooses of a call to ``method``: half of them forged, if it can be."""
    _, variants, vocabulary = METHODS[method]
    families = ("token", "raw") if method in UNFORGEABLE else ("forged", "forged", "token", "raw")
    faults = (
        st.lists(st.sampled_from(vocabulary), max_size=2, unique=True)
        if vocabulary
        else st.just([])
    )
    return st.builds(
        Plan,
        family=st.sampled_from(families),
        variant=st.sampled_from(variants),
        faults=faults.map(tuple),
        seed=st.integers(0, U64),
    )


def forge(method: str, plan: Plan, token: str) -> Forgery:
    """The call a plan stands for."""
    content, _, _ = METHODS[method]
    pick = Picker(plan.seed)
    if plan.family == "forged":
        return content(pick, plan.variant, plan.faults, must_fault=True)
    base = content(pick, plan.variant, plan.faults, must_fault=False)
    if plan.family == "raw":
        return raw_bytes(method, pick, base, token)
    return replace(base, metadata=bad_metadata(pick, token), what=f"{base.what}, bad token")


# -- sending ---------------------------------------------------------------------


def _reject(error: grpc.RpcError) -> pb.Reject | None:
    for key, value in error.trailing_metadata() or ():
        if key == codec.REJECT_KEY:
            return pb.Reject.FromString(value)
    return None


def _check_refusal(error: grpc.RpcError, reasons: Codes, what: str) -> str:
    """The RejectCode of a refusal that is typed, consistent and one of ``reasons``."""
    code, details = error.code(), error.details() or ""
    context = f"{what}: {code.name} {details[:300]!r}"
    assert code in REFUSALS, context
    reject = _reject(error)
    assert reject is not None, f"{context}: no Reject in the trailing metadata"
    name = pb.RejectCode.Name(reject.code)
    assert reject.message and details == f"{name}: {reject.message}", context
    assert code == STATUS_OF.get(name, grpc.StatusCode.INVALID_ARGUMENT), context
    assert name in reasons, f"{context}: expected one of {sorted(reasons)}"
    return name


def _caller(channel: grpc.Channel, method: str) -> Callable[[Sequence[bytes], Metadata], Any]:
    """Calls ``method`` with serialized messages (a stream for Push), as the wire has them."""
    path = f"/{codec.SERVICE}/{method}"
    if method == "Push":
        push = channel.stream_unary(path)
        return lambda messages, metadata: push(
            iter(messages), metadata=metadata, timeout=CALL_TIMEOUT
        )
    if method == "Pull":
        pull = channel.unary_stream(path)
        return lambda messages, metadata: list(
            pull(messages[0], metadata=metadata, timeout=CALL_TIMEOUT)
        )
    unary = channel.unary_unary(path)
    return lambda messages, metadata: unary(messages[0], metadata=metadata, timeout=CALL_TIMEOUT)


class Target:
    """The fuzzed server, as a forger holding the token and a session reaches it.

    Sends each forgery, checks its refusal and counts it (``sent`` by method,
    ``refused`` by RejectCode). Keeps the session's last sequence number, as
    the server does, to tell fresh numbers from used ones.
    """

    def __init__(
        self, channel: grpc.Channel, token: str, session: bytes, segment: shared.Segment
    ) -> None:
        self.token = token
        self._metadata: Metadata = ((codec.TOKEN_KEY, token),)
        self._session = session
        self._segment = segment
        self._last_seq = 0
        self._call = {method: _caller(channel, method) for method in QUOTAS}
        self.sent: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def send(self, forgery: Forgery) -> None:
        messages, reasons, seq = list(forgery.messages), forgery.reasons, None
        choice = forgery.session
        if choice is not None:
            key, number, fresh = self._resolve(choice)
            if forgery.method == "Goodbye":
                fields = pb.GoodbyeRequest(session=key)
            else:
                fields = pb.SharedPullRequest(session=key, seq=number)  # as the other shared requests'
            messages[0] += fields.SerializeToString()  # the last value of a field counts
            if fresh:
                seq = number
            else:
                reasons |= _codes("BAD_SESSION")
        if forgery.metadata is None:
            metadata = self._metadata
            if seq is not None and forgery.segment is not None:
                assert len(forgery.segment) <= SEGMENT_BYTES, forgery.what
                self._segment.view[: len(forgery.segment)] = forgery.segment
        else:
            metadata, reasons, seq = forgery.metadata, _codes("BAD_TOKEN"), None
        assert reasons, f"{forgery.what} would be a valid call"
        try:
            self._call[forgery.method](messages, metadata)
        except grpc.RpcError as error:
            self.refused[_check_refusal(error, reasons, forgery.what)] += 1
        else:
            raise AssertionError(f"{forgery.what} was accepted")
        finally:
            if seq is not None and choice is not None and choice.reached:
                self._last_seq = seq  # the server took it before it refused the call
        self.sent[forgery.method] += 1

    def send_oversized(self, method: str) -> None:
        """A message a byte over gRPC's limit, with the token: gRPC refuses it itself."""
        try:
            self._call[method]([b"\0" * (codec.MAX_MESSAGE_BYTES + 1)], self._metadata)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, error)
            assert error.details(), method
        else:
            raise AssertionError(f"an oversized {method} was accepted")
        self.sent[method] += 1
        self.refused["RESOURCE_EXHAUSTED"] += 1

    def pull_shared(self) -> tuple[pb.TensorHeader, bytes]:
        """A valid pull through the session: the header, and the float32 bytes it wrote."""
        self._last_seq += 1
        request = pb.SharedPullRequest(session=self._session, seq=self._last_seq)
        reply = self._call["PullShared"]([request.SerializeToString()], self._metadata)
        header = pb.SharedPullReply.FromString(reply).header
        return header, bytes(self._segment.view[:SEGMENT_BYTES])

    def _resolve(self, choice: SessionChoice) -> tuple[bytes, int, bool]:
        """The key and sequence number to send, and whether they are fresh ones of the session."""
        if choice.key is None:
            if choice.fresh:
                return self._session, self._last_seq + 1 + choice.step, True
            return self._session, max(0, self._last_seq - choice.step), False
        key = choice.key if choice.key != self._session else choice.key + b"!"
        return key, choice.step, False


def _volley(target: Target, method: str) -> None:
    """``QUOTAS[method]`` forgeries to ``method``, ``BATCH`` an example."""

    @settings(
        max_examples=QUOTAS[method] // BATCH,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # the server's state goes on: no replaying or shrinking
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(plans(method), min_size=BATCH, max_size=BATCH))
    def send(batch: list[Plan]) -> None:
        for plan in batch:
            target.send(forge(method, plan, target.token))

    send()


# -- the tests -------------------------------------------------------------------


def test_every_rpc_of_the_service_is_fuzzed():
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert {method.name for method in service.methods} == set(QUOTAS) == set(METHODS)
    assert sum(QUOTAS.values()) == MESSAGES


@pytest.mark.timeout(600)
def test_ten_thousand_forged_or_malformed_calls_are_refused_and_change_nothing(tmp_path):
    if not shared.available():
        pytest.skip("no POSIX shared memory here: PullShared and PushShared cannot be reached")
    token = new_token()
    server = ServerProcess(token, tmp_path / "server.log")
    segment = None
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = downpour_pb2_grpc.ParameterServerStub(channel)
            metadata = ((codec.TOKEN_KEY, token),)
            hello = stub.Hello(
                pb.HelloRequest(shard_id=0, shared_memory=True),
                metadata=metadata,
                timeout=CALL_TIMEOUT,
            )
            assert hello.HasField("segment"), f"no shared-memory session:\n{server.log()}"
            segment = shared.Segment.attach(hello.segment.name, hello.segment.size)
            target = Target(channel, token, hello.segment.session, segment)
            pull_small = _caller(channel, "PullSmall")
            request = [pb.PullRequest(shard_id=0).SerializeToString()]
            served = pull_small(request, metadata)
            header, data = target.pull_shared()
            assert (header.version, data) == (0, pb.TensorChunk.FromString(served).data)

            for method, quota in QUOTAS.items():
                _volley(target, method)
                assert target.sent[method] == quota, (method, target.sent)
            for method in QUOTAS:
                target.send_oversized(method)

            assert sum(target.sent.values()) == MESSAGES + len(QUOTAS), target.sent
            assert server.alive(), server.log()
            status = stub.Status(
                pb.StatusRequest(shard_id=0), metadata=metadata, timeout=CALL_TIMEOUT
            )
            assert (status.version, status.pushes, status.applied, status.updates) == (0, 0, 0, 0)
            assert pull_small(request, metadata) == served  # the same bytes, version 0 included
            assert target.pull_shared() == (header, data)  # read afresh, not memoized
            stub.Goodbye(
                pb.GoodbyeRequest(session=hello.segment.session),
                metadata=metadata,
                timeout=CALL_TIMEOUT,
            )
        assert server.stop() == {"shutdown_requested": False}
        assert "Traceback" not in server.log() and "Exception" not in server.log(), server.log()
    finally:
        if segment is not None:
            segment.close()
        server.kill()


@pytest.fixture
def metadata(token) -> Metadata:
    return ((codec.TOKEN_KEY, token),)


@pytest.mark.timeout(60)
def test_a_refusal_quoting_a_huge_forged_field_still_says_why(serve, stub, metadata):
    """Regression: a 20 KB vector name or a shape of 3000 numbers quoted in a refusal made
    its trailing metadata exceed gRPC's 16 KiB: RESOURCE_EXHAUSTED, "Stream removed", no reason.
    """
    server = serve(ServerShard(torch.zeros(8), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)))
    ps = stub(server.address)
    zero = pb.VectorOp.ZERO
    header = pb.PushHeader(
        kind=pb.GRADIENT, encoding=pb.DENSE, dtype=pb.FLOAT32, shape=[8] * 3_000, num_chunks=1
    )
    calls = [
        (ps.VectorOps, pb.VectorOpsRequest(ops=[pb.VectorOp(code=zero, dst="v" * 20_000)])),
        (ps.VectorOps, pb.VectorOpsRequest(ops=[pb.VectorOp(code=zero, dst="é" * 4_000)])),
        (ps.PushSmall, pb.PushChunk(header=header)),
    ]
    for (call, request), reason in zip(calls, ["BAD_REQUEST", "BAD_REQUEST", "BAD_LENGTH"]):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=metadata, timeout=10)
        assert _check_refusal(caught.value, _codes(reason), reason) == reason
        message = _reject(caught.value).message
        assert message.endswith("...") and len(message.encode()) <= MAX_REJECT_BYTES


@pytest.mark.timeout(60)
def test_a_onebit_payload_declaring_a_chunk_of_four_billion_is_one_chunk(serve, stub, metadata):
    """Regression: decoding padded the bits out to the declared chunk, 4 GiB for 2 KB sent."""
    size = 64
    message = pb.Compressed()
    onebit = message.onebit
    onebit.size, onebit.chunk, onebit.dtype = size, U32, pb.FLOAT32
    nonnegative = torch.arange(size) % 3 == 0
    onebit.bits = pack_bits(nonnegative)
    onebit.positive = np.array([0.5], "<f4").tobytes()
    onebit.negative = np.array([-0.25], "<f4").tobytes()
    data = message.SerializeToString()
    payload = from_bytes(data, expected_size=size)
    assert payload.chunk == U32 and payload.num_chunks == 1  # kept as sent: one chunk, the whole vector
    expected = torch.where(nonnegative, 0.5, -0.25)
    assert torch.equal(as_update(payload), expected)

    shard = ServerShard(torch.zeros(size))
    header = pb.PushHeader(
        kind=pb.DELTA, encoding=pb.COMPRESSED, shape=[size], num_chunks=1, payload_bytes=len(data)
    )
    reply = stub(serve(shard).address).PushSmall(
        pb.PushChunk(header=header, values=data), metadata=metadata, timeout=10
    )
    assert reply.applied
    assert torch.equal(shard.pull()[1], expected)


@pytest.mark.timeout(60)
def test_vector_ops_refuse_an_alpha_beyond_float32(serve, stub, metadata):
    """Regression: a finite double alpha beyond float32 made the parameters infinite."""
    shard = ServerShard(torch.ones(8))
    ps = stub(serve(shard).address)
    for code in (pb.VectorOp.SCALE, pb.VectorOp.AXPY):
        for alpha in (1e39, -1e300):
            request = pb.VectorOpsRequest(ops=[pb.VectorOp(code=code, dst="x", a="x", alpha=alpha)])
            with pytest.raises(grpc.RpcError) as caught:
                ps.VectorOps(request, metadata=metadata, timeout=10)
            assert _check_refusal(caught.value, _codes("NON_FINITE"), str(alpha)) == "NON_FINITE"
            assert "beyond float32's range" in caught.value.details()
    version, params = shard.pull()
    assert version == 0 and torch.equal(params, torch.ones(8))
    largest = float(np.finfo(np.float32).max)  # still an alpha
    ops = [pb.VectorOp(code=pb.VectorOp.SCALE, dst="x", alpha=largest)]
    assert ps.VectorOps(pb.VectorOpsRequest(ops=ops), metadata=metadata, timeout=10).version == 1
    assert torch.equal(shard.pull()[1], torch.full((8,), largest))
