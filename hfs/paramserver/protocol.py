"""The wire format of `hfs serve-params` (version 1), small enough to speak from any language.

A message is a ZeroMQ multipart message::

    frame 0      header: UTF-8 JSON object
    frames 1..n  raw arrays, C order, little endian, described by header["arrays"]
    last frame   HMAC-SHA256 tag (32 bytes), only when the server has a shared secret

Header fields: ``v`` (protocol version, 1), ``op`` (request) or ``ok`` (reply), ``id`` (any
integer the client picks; the reply echoes it), ``arrays`` (one ``{"dtype": "float32" |
"int64", "shape": [...]}`` per array frame; may be omitted when there is none), plus the
op's own fields. After a ``shm`` handshake an ``arrays`` entry may instead carry ``"shm":
OFFSET``: that array has no frame, it lies at OFFSET in the client's shared-memory segment
(see :mod:`hfs.paramserver.shm`). Errors come back as ``{"v": 1, "id": ..., "ok": false, "error": "..."}``.

The HMAC covers every frame before it: for each frame, its length as an 8-byte little
endian unsigned integer, then its bytes. Replies from a server with a secret are signed
the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hfs.utils.errors import HfsError
from hfs.utils.typed import coerce, field_values, fits, rules

PROTOCOL_VERSION = 1
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 8
DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
#: Every request op and what it does; the protocol table of docs/parameter-server.md lists the same (a test checks).
OPS = {
    "ping": "who is there: shard index/count, peer endpoints, matrices, protocol version",
    "register": "join the synchronous workers (field worker)",
    "leave": "leave the synchronous workers (field worker)",
    "create": "create a matrix (matrix, rows, dim, init, std, seed, exist_ok, update_rule)",
    "get": "read rows (matrix; frame rows int64[n], or fields start/stop; optional step) -> float32[n, dim]",
    "set": "overwrite rows (matrix; frames rows int64[n], values float32[n, dim])",
    "push": "add gradients to a step (matrix, step, worker; frames rows int64[n], grads float32[n, dim])",
    "hparams": "set lr, momentum, weight_decay of a matrix",
    "snapshot": "write a snapshot (optional tag) -> name, step",
    "restore": "load a snapshot (tag, 'latest' by default) -> step",
    "stats": "request counts, bytes, latency percentiles, store counters, each index's builds and drift",
    "index": "keep an index over the matrix's rows here (matrix, spec: an IndexSpec object); the same spec again "
             "is a no-op -> attached",
    "select": "active classes from this shard's index (matrix, step, k, rows, rule: a SelectionRule object; frames "
              "features float32[B, dim], labels int64[B]; waits like get) -> rows true: active int64[S], local "
              "int64[B], values float32[S, dim][, logit_adjust float32[S]]; rows false: ids int64[B, k'], "
              "sims float32[B, k'] (k' = 0 while no index is ready)",
    "shutdown": "final snapshot, then stop",
    "shm": "map this client's shared-memory segment (path, size, reply_offset, nonce; same host only); arrays of "
           "later requests and replies on this connection may then lie in it (arrays entry field shm: offset) "
           "-> attached",
    "detach": "unmap this connection's shared-memory segment now (a closing client; idle ones also expire) "
              "-> detached",
}
#: The start of the error a request gets when it names shared memory its connection has not attached.
NO_SEGMENT_ERROR = "no shared-memory segment is attached for this connection"


class ProtocolError(HfsError):
    """A message that does not follow the wire format; the text names the field or frame."""


@dataclass
class Message:
    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)
    #: per array: True when it is a view of the shared-memory segment (the sender may overwrite it later)
    in_segment: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class InSegment:
    """An array already written to the peer's shared-memory segment: encoded as its offset, no frame."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def sign(frames: Sequence[Any], secret: bytes) -> bytes:
    """HMAC-SHA256 over each frame's 8-byte little-endian length and bytes."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for frame in frames:
        view = memoryview(frame)
        mac.update(struct.pack("<Q", view.nbytes))
        mac.update(view)
    return mac.digest()


def encode(header: dict[str, Any], arrays: Sequence[np.ndarray | InSegment] = (), secret: bytes | None = None
           ) -> list[Any]:
    """Frames of a message; arrays are passed as buffers so zmq can send them without a copy
    (an :class:`InSegment` becomes an ``arrays`` entry with its offset and no frame)."""
    bufs = []
    specs = []
    for arr in arrays:
        if isinstance(arr, InSegment):
            specs.append({"dtype": _dtype_name(arr.dtype), "shape": list(arr.shape), "shm": arr.offset})
            continue
        arr = np.ascontiguousarray(arr)
        specs.append({"dtype": _dtype_name(arr.dtype), "shape": list(arr.shape)})
        bufs.append(arr)
    head = dict(header, v=PROTOCOL_VERSION)
    if specs:
        head["arrays"] = specs
    frames: list[Any] = [json.dumps(head, separators=(",", ":")).encode()] + bufs
    if secret:
        frames.append(sign(frames, secret))
    return frames


def _dtype_name(dtype: np.dtype) -> str:
    name = next((k for k, dt in DTYPES.items() if dtype == dt), None)
    if name is None:
        raise ProtocolError(f"cannot send dtype {dtype}; the protocol carries {', '.join(DTYPES)}")
    return name


@dataclass
class ArraySpec:
    """One entry of a header's ``arrays``: a frame's dtype and shape, or where it lies in the segment."""

    dtype: str = field(metadata=rules(choices=tuple(DTYPES)))
    shape: list[int] = field(metadata=rules(ge=0, lt=2**40))
    shm: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _array_specs(header: dict[str, Any]) -> list[ArraySpec]:
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError(f"header field 'arrays' must be a list of at most {MAX_ARRAYS} entries")
    out = [ArraySpec(**field_values(ArraySpec, spec, f"header arrays[{i}]", error=ProtocolError, strict=False))
           for i, spec in enumerate(specs)]
    for i, spec in enumerate(out):
        if not 1 <= len(spec.shape) <= 2:
            raise ProtocolError(f"header arrays[{i}] field 'shape' {spec.shape!r} must be a list of 1 or 2 sizes")
    return out


def _verified(views: list[memoryview], secret: bytes | None) -> list[memoryview]:
    """The frames before the HMAC frame, once the HMAC checks out (all of them without a secret)."""
    if not secret:
        return views
    if len(views) < 2 or views[-1].nbytes != MAC_BYTES:
        raise ProtocolError("authentication failed: missing HMAC frame (this server needs the shared secret)")
    if not hmac.compare_digest(sign(views[:-1], secret), views[-1].tobytes()):
        raise ProtocolError("authentication failed: bad HMAC (wrong shared secret?)")
    return views[:-1]


def _header(view: memoryview) -> dict[str, Any]:
    """The JSON header of a message, of this protocol version."""
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {view.nbytes} bytes exceeds {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(view.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    version = header.get("v")
    if not fits(version, int) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    return header


def _framed_array(view: memoryview, i: int, spec: ArraySpec) -> np.ndarray:
    dtype = DTYPES[spec.dtype]
    if view.nbytes != spec.nbytes:
        raise ProtocolError(f"array frame {i + 1} has {view.nbytes} bytes, {dtype.name}{spec.shape} needs {spec.nbytes}")
    return np.frombuffer(view, dtype=dtype).reshape(spec.shape)


def _arrays(data: list[memoryview], specs: list[ArraySpec], segment: Any) -> tuple[list[np.ndarray], list[bool]]:
    """The message's arrays (views of its frames or of the segment) and which lie in the segment."""
    framed = sum(1 for spec in specs if spec.shm is None)
    if len(data) != framed:
        hint = " (a signed message sent to a server without a secret?)" if len(data) == framed + 1 else ""
        raise ProtocolError(f"header announces {framed} array frame(s), message has {len(data)}{hint}")
    if framed < len(specs) and segment is None:
        raise ProtocolError(NO_SEGMENT_ERROR + " (send op 'shm' first, or the arrays as frames)")
    frames = iter(data)
    arrays = [segment.array(DTYPES[spec.dtype], tuple(spec.shape), spec.shm) if spec.shm is not None
              else _framed_array(next(frames), i, spec) for i, spec in enumerate(specs)]
    return arrays, [spec.shm is not None for spec in specs]


def decode(frames: Sequence[Any], secret: bytes | None = None, max_bytes: int | None = None,
           segment: Any = None) -> Message:
    """Parse and check a message's frames (zmq Frames or bytes); arrays are views, not copies.

    ``segment`` (a :class:`hfs.paramserver.shm.SegmentView`, or None when none is attached)
    resolves ``arrays`` entries that carry a ``shm`` offset; each is bounds-checked against it.
    """
    if not frames:
        raise ProtocolError("empty message")
    views = [memoryview(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if max_bytes is not None and total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes")
    views = _verified(views, secret)
    header = _header(views[0])
    specs = _array_specs(header)
    arrays, in_segment = _arrays(views[1:], specs, segment)
    shared_bytes = sum(spec.nbytes for spec in specs if spec.shm is not None)
    if max_bytes is not None and total + shared_bytes > max_bytes:
        raise ProtocolError(f"message of {total + shared_bytes} bytes (with its shared-memory arrays) exceeds the "
                            f"limit of {max_bytes} bytes")
    return Message(header, arrays, in_segment)


def field_of(header: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A header field of the given type (a JSON number: finite), or a ProtocolError naming it; a field
    that is missing or null is ``default`` (none given: an error)."""
    if header.get(key) is None:
        if default is ...:
            raise ProtocolError(f"header field '{key}' is missing")
        return default
    hint = typing.Union[kind] if isinstance(kind, tuple) else kind
    return coerce(f"header field '{key}'", header[key], hint, error=ProtocolError, finite=True)


def peek_id(frames: Sequence[Any]) -> int | None:
    """Best-effort request id of a message that failed to decode, so its error reply can echo it."""
    try:
        view = memoryview(frames[0])
        if view.nbytes > MAX_HEADER_BYTES:
            return None
        value = json.loads(view.tobytes().decode("utf-8")).get("id")
    except Exception:
        return None
    return value if fits(value, int) else None


def error_reply(request_id: Any, message: str) -> dict[str, Any]:
    return {"id": request_id if fits(request_id, int) else None, "ok": False, "error": message}
