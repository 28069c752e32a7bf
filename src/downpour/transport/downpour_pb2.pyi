from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    GRADIENT: _ClassVar[UpdateKind]
    DELTA: _ClassVar[UpdateKind]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    DENSE: _ClassVar[Encoding]
    SPARSE: _ClassVar[Encoding]
    COMPRESSED: _ClassVar[Encoding]

class RejectCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_CODE_UNSPECIFIED: _ClassVar[RejectCode]
    BAD_TOKEN: _ClassVar[RejectCode]
    BAD_SHARD: _ClassVar[RejectCode]
    BAD_HEADER: _ClassVar[RejectCode]
    BAD_LENGTH: _ClassVar[RejectCode]
    BAD_DTYPE: _ClassVar[RejectCode]
    BAD_CHUNK_ORDER: _ClassVar[RejectCode]
    BAD_CHUNK_COUNT: _ClassVar[RejectCode]
    BAD_INDEX: _ClassVar[RejectCode]
    NON_FINITE: _ClassVar[RejectCode]
    STALE: _ClassVar[RejectCode]
    BAD_VERSION: _ClassVar[RejectCode]
    BAD_KIND: _ClassVar[RejectCode]
    BAD_ENCODING: _ClassVar[RejectCode]
    BAD_REQUEST: _ClassVar[RejectCode]
    MALFORMED: _ClassVar[RejectCode]
    TIMEOUT: _ClassVar[RejectCode]
    SHUTTING_DOWN: _ClassVar[RejectCode]
    BAD_SESSION: _ClassVar[RejectCode]
    BAD_PAYLOAD: _ClassVar[RejectCode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT32: DType
INT64: DType
UPDATE_KIND_UNSPECIFIED: UpdateKind
GRADIENT: UpdateKind
DELTA: UpdateKind
ENCODING_UNSPECIFIED: Encoding
DENSE: Encoding
SPARSE: Encoding
COMPRESSED: Encoding
REJECT_CODE_UNSPECIFIED: RejectCode
BAD_TOKEN: RejectCode
BAD_SHARD: RejectCode
BAD_HEADER: RejectCode
BAD_LENGTH: RejectCode
BAD_DTYPE: RejectCode
BAD_CHUNK_ORDER: RejectCode
BAD_CHUNK_COUNT: RejectCode
BAD_INDEX: RejectCode
NON_FINITE: RejectCode
STALE: RejectCode
BAD_VERSION: RejectCode
BAD_KIND: RejectCode
BAD_ENCODING: RejectCode
BAD_REQUEST: RejectCode
MALFORMED: RejectCode
TIMEOUT: RejectCode
SHUTTING_DOWN: RejectCode
BAD_SESSION: RejectCode
BAD_PAYLOAD: RejectCode

class Reject(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: RejectCode
    message: str
    def __init__(self, code: _Optional[_Union[RejectCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("shard_id", "newer_than", "wait_version", "average", "dtype")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NEWER_THAN_FIELD_NUMBER: _ClassVar[int]
    WAIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    newer_than: int
    wait_version: int
    average: bool
    dtype: DType
    def __init__(self, shard_id: _Optional[int] = ..., newer_than: _Optional[int] = ..., wait_version: _Optional[int] = ..., average: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("shard_id", "version", "not_newer", "dtype", "shape", "num_chunks")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NOT_NEWER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    version: int
    not_newer: bool
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    num_chunks: int
    def __init__(self, shard_id: _Optional[int] = ..., version: _Optional[int] = ..., not_newer: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("seq", "header", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    header: TensorHeader
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("shard_id", "worker", "version", "kind", "encoding", "dtype", "index_dtype", "shape", "nnz", "num_chunks", "payload_bytes", "portion")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PORTION_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    worker: int
    version: int
    kind: UpdateKind
    encoding: Encoding
    dtype: DType
    index_dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nnz: int
    num_chunks: int
    payload_bytes: int
    portion: int
    def __init__(self, shard_id: _Optional[int] = ..., worker: _Optional[int] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., index_dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nnz: _Optional[int] = ..., num_chunks: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., portion: _Optional[int] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("seq", "header", "values", "indices")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    header: PushHeader
    values: bytes
    indices: bytes
    def __init__(self, seq: _Optional[int] = ..., header: _Optional[_Union[PushHeader, _Mapping]] = ..., values: _Optional[bytes] = ..., indices: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("applied", "dropped", "staleness", "version")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    dropped: bool
    staleness: int
    version: int
    def __init__(self, applied: _Optional[bool] = ..., dropped: _Optional[bool] = ..., staleness: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("shard_id",)
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    def __init__(self, shard_id: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("shard_id", "start", "stop", "version", "policy", "pushes", "pulls", "applied", "dropped", "refused", "folded", "pending", "updates", "staleness", "has_average")
    class StalenessEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    FOLDED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    HAS_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    start: int
    stop: int
    version: int
    policy: str
    pushes: int
    pulls: int
    applied: int
    dropped: int
    refused: int
    folded: int
    pending: int
    updates: int
    staleness: _containers.ScalarMap[int, int]
    has_average: bool
    def __init__(self, shard_id: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., version: _Optional[int] = ..., policy: _Optional[str] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., applied: _Optional[int] = ..., dropped: _Optional[int] = ..., refused: _Optional[int] = ..., folded: _Optional[int] = ..., pending: _Optional[int] = ..., updates: _Optional[int] = ..., staleness: _Optional[_Mapping[int, int]] = ..., has_average: _Optional[bool] = ...) -> None: ...

class PushPullRequest(_message.Message):
    __slots__ = ("push", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushChunk
    pull: PullRequest
    def __init__(self, push: _Optional[_Union[PushChunk, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class PushPullReply(_message.Message):
    __slots__ = ("push", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushReply
    pull: TensorChunk
    def __init__(self, push: _Optional[_Union[PushReply, _Mapping]] = ..., pull: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("shard_id", "shared_memory", "tcp_session")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    TCP_SESSION_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    shared_memory: bool
    tcp_session: bool
    def __init__(self, shard_id: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., tcp_session: _Optional[bool] = ...) -> None: ...

class SharedSegment(_message.Message):
    __slots__ = ("session", "name", "size", "socket", "port")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    name: str
    size: int
    socket: str
    port: int
    def __init__(self, session: _Optional[bytes] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., socket: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("shard_id", "size", "chunk_bytes", "segment")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    size: int
    chunk_bytes: int
    segment: SharedSegment
    def __init__(self, shard_id: _Optional[int] = ..., size: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., segment: _Optional[_Union[SharedSegment, _Mapping]] = ...) -> None: ...

class SharedPullRequest(_message.Message):
    __slots__ = ("session", "seq", "request")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    seq: int
    request: PullRequest
    def __init__(self, session: _Optional[bytes] = ..., seq: _Optional[int] = ..., request: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class SharedPullReply(_message.Message):
    __slots__ = ("seq", "header")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    header: TensorHeader
    def __init__(self, seq: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class SharedPushRequest(_message.Message):
    __slots__ = ("session", "seq", "header")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    seq: int
    header: PushHeader
    def __init__(self, session: _Optional[bytes] = ..., seq: _Optional[int] = ..., header: _Optional[_Union[PushHeader, _Mapping]] = ...) -> None: ...

class SharedPushPullRequest(_message.Message):
    __slots__ = ("session", "seq", "push", "pull")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    seq: int
    push: PushHeader
    pull: PullRequest
    def __init__(self, session: _Optional[bytes] = ..., seq: _Optional[int] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ...) -> None: ...

class SharedPushPullReply(_message.Message):
    __slots__ = ("seq", "push", "pull")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    push: PushReply
    pull: TensorHeader
    def __init__(self, seq: _Optional[int] = ..., push: _Optional[_Union[PushReply, _Mapping]] = ..., pull: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class GoodbyeRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    def __init__(self, session: _Optional[bytes] = ...) -> None: ...

class GoodbyeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Compressed(_message.Message):
    __slots__ = ("dense", "sparse", "signs", "onebit")
    class Dense(_message.Message):
        __slots__ = ("dtype", "values")
        DTYPE_FIELD_NUMBER: _ClassVar[int]
        VALUES_FIELD_NUMBER: _ClassVar[int]
        dtype: DType
        values: bytes
        def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., values: _Optional[bytes] = ...) -> None: ...
    class Indices(_message.Message):
        __slots__ = ("raw", "deflated")
        RAW_FIELD_NUMBER: _ClassVar[int]
        DEFLATED_FIELD_NUMBER: _ClassVar[int]
        raw: bytes
        deflated: bytes
        def __init__(self, raw: _Optional[bytes] = ..., deflated: _Optional[bytes] = ...) -> None: ...
    class Sparse(_message.Message):
        __slots__ = ("size", "nnz", "dtype", "indices", "values")
        SIZE_FIELD_NUMBER: _ClassVar[int]
        NNZ_FIELD_NUMBER: _ClassVar[int]
        DTYPE_FIELD_NUMBER: _ClassVar[int]
        INDICES_FIELD_NUMBER: _ClassVar[int]
        VALUES_FIELD_NUMBER: _ClassVar[int]
        size: int
        nnz: int
        dtype: DType
        indices: Compressed.Indices
        values: bytes
        def __init__(self, size: _Optional[int] = ..., nnz: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., indices: _Optional[_Union[Compressed.Indices, _Mapping]] = ..., values: _Optional[bytes] = ...) -> None: ...
    class Signs(_message.Message):
        __slots__ = ("size", "nnz", "tau", "indices", "negative")
        SIZE_FIELD_NUMBER: _ClassVar[int]
        NNZ_FIELD_NUMBER: _ClassVar[int]
        TAU_FIELD_NUMBER: _ClassVar[int]
        INDICES_FIELD_NUMBER: _ClassVar[int]
        NEGATIVE_FIELD_NUMBER: _ClassVar[int]
        size: int
        nnz: int
        tau: float
        indices: Compressed.Indices
        negative: bytes
        def __init__(self, size: _Optional[int] = ..., nnz: _Optional[int] = ..., tau: _Optional[float] = ..., indices: _Optional[_Union[Compressed.Indices, _Mapping]] = ..., negative: _Optional[bytes] = ...) -> None: ...
    class OneBit(_message.Message):
        __slots__ = ("size", "chunk", "dtype", "bits", "positive", "negative")
        SIZE_FIELD_NUMBER: _ClassVar[int]
        CHUNK_FIELD_NUMBER: _ClassVar[int]
        DTYPE_FIELD_NUMBER: _ClassVar[int]
        BITS_FIELD_NUMBER: _ClassVar[int]
        POSITIVE_FIELD_NUMBER: _ClassVar[int]
        NEGATIVE_FIELD_NUMBER: _ClassVar[int]
        size: int
        chunk: int
        dtype: DType
        bits: bytes
        positive: bytes
        negative: bytes
        def __init__(self, size: _Optional[int] = ..., chunk: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., bits: _Optional[bytes] = ..., positive: _Optional[bytes] = ..., negative: _Optional[bytes] = ...) -> None: ...
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    ONEBIT_FIELD_NUMBER: _ClassVar[int]
    dense: Compressed.Dense
    sparse: Compressed.Sparse
    signs: Compressed.Signs
    onebit: Compressed.OneBit
    def __init__(self, dense: _Optional[_Union[Compressed.Dense, _Mapping]] = ..., sparse: _Optional[_Union[Compressed.Sparse, _Mapping]] = ..., signs: _Optional[_Union[Compressed.Signs, _Mapping]] = ..., onebit: _Optional[_Union[Compressed.OneBit, _Mapping]] = ...) -> None: ...

class VectorOp(_message.Message):
    __slots__ = ("code", "dst", "a", "b", "alpha")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[VectorOp.Code]
        ZERO: _ClassVar[VectorOp.Code]
        COPY: _ClassVar[VectorOp.Code]
        SCALE: _ClassVar[VectorOp.Code]
        AXPY: _ClassVar[VectorOp.Code]
        DOT: _ClassVar[VectorOp.Code]
        DROP: _ClassVar[VectorOp.Code]
    CODE_UNSPECIFIED: VectorOp.Code
    ZERO: VectorOp.Code
    COPY: VectorOp.Code
    SCALE: VectorOp.Code
    AXPY: VectorOp.Code
    DOT: VectorOp.Code
    DROP: VectorOp.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    code: VectorOp.Code
    dst: str
    a: str
    b: str
    alpha: float
    def __init__(self, code: _Optional[_Union[VectorOp.Code, str]] = ..., dst: _Optional[str] = ..., a: _Optional[str] = ..., b: _Optional[str] = ..., alpha: _Optional[float] = ...) -> None: ...

class VectorOpsRequest(_message.Message):
    __slots__ = ("shard_id", "ops")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    ops: _containers.RepeatedCompositeFieldContainer[VectorOp]
    def __init__(self, shard_id: _Optional[int] = ..., ops: _Optional[_Iterable[_Union[VectorOp, _Mapping]]] = ...) -> None: ...

class VectorOpsReply(_message.Message):
    __slots__ = ("values", "version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...
