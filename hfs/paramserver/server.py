"""The weight store behind a ZeroMQ ROUTER socket: one shard of `hfs serve-params`.

One thread runs the loop: receive a message, parse it (`protocol.decode`, then each op's
header fields by type), call the in-process store (which checks the values' ranges, once for
every caller), reply (a get or select replies from inside the store's
read, as soon as the rows' values are known). A `get` for a step that is not applied yet is
*deferred*: it waits in a list, the loop keeps serving others, and the reply goes out when
the step is applied (or fails). A bad message never stops the loop: every error, expected
or not, becomes an error reply and nothing in the store changes.

Starting one (options from the config, resume, signals, the final snapshot) and supervising a
group of shard processes is :mod:`hfs.paramserver.launch`'s.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from hfs.paramserver import protocol as proto
from hfs.paramserver.base import HParams
from hfs.paramserver.store import InProcessStore
from hfs.utils.errors import HfsError
from hfs.utils.typed import fits

log = logging.getLogger(__name__)

_LATENCY_WINDOW = 4096


class OpStats:
    """Requests, errors, bytes and a window of latencies per op."""

    def __init__(self) -> None:
        self.count: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.shm_bytes_in = 0
        self.shm_bytes_out = 0
        self.latency: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=_LATENCY_WINDOW))

    def record(self, op: str, seconds: float, ok: bool) -> None:
        self.count[op] += 1
        if not ok:
            self.errors[op] += 1
        self.latency[op].append(seconds)

    def summary(self) -> dict[str, Any]:
        ops = {}
        for op, n in sorted(self.count.items()):
            lat = np.asarray(self.latency[op], dtype=np.float64) * 1e3
            p50, p90, p99 = np.percentile(lat, [50, 90, 99]) if lat.size else (0.0, 0.0, 0.0)
            ops[op] = {"requests": n, "errors": self.errors[op], "p50_ms": round(float(p50), 4),
                       "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4)}
        return {"requests": int(sum(self.count.values())), "errors": int(sum(self.errors.values())),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "shm_bytes_in": self.shm_bytes_in,
                "shm_bytes_out": self.shm_bytes_out, "ops": ops}


#: a handler's result when it has sent its reply itself (see ParamServer._answered_early)
_ANSWERED = object()


@dataclass
class _Waiting:
    """A `get` or `select` that waits for a step to be applied: ``attempt()`` answers it, or None."""

    envelope: list
    request_id: Any
    started: float
    op: str
    attempt: Callable[[], tuple[dict, list] | None]


def _arrays(msg: proto.Message, spec: Sequence[tuple[str, str, int]]) -> list[np.ndarray]:
    """The message's arrays, checked against (name, dtype, ndim) per frame."""
    if len(msg.arrays) != len(spec):
        names = ", ".join(f"{n} {d}[{'n' if nd == 1 else 'n, dim'}]" for n, d, nd in spec) or "no arrays"
        raise proto.ProtocolError(f"op '{msg.header.get('op')}' takes {len(spec)} array frame(s) ({names}), "
                                  f"got {len(msg.arrays)}")
    for arr, (name, dtype, ndim) in zip(msg.arrays, spec):
        if arr.dtype != proto.DTYPES[dtype] or arr.ndim != ndim:
            raise proto.ProtocolError(f"array '{name}' must be {dtype} with {ndim} dimension(s), "
                                      f"got {arr.dtype.name}{list(arr.shape)}")
    if len(spec) == 2 and msg.arrays[0].shape[0] != msg.arrays[1].shape[0]:
        raise proto.ProtocolError(f"arrays '{spec[0][0]}' and '{spec[1][0]}' have {msg.arrays[0].shape[0]} and "
                                  f"{msg.arrays[1].shape[0]} rows")
    return msg.arrays


def _select_arrays(msg: proto.Message) -> tuple[np.ndarray, np.ndarray]:
    """A select's features float32[B, dim] and labels int64[B]."""
    if len(msg.arrays) != 2:
        raise proto.ProtocolError(f"op 'select' takes 2 array frames (features float32[B, dim], labels int64[B]), "
                                  f"got {len(msg.arrays)}")
    features, labels = msg.arrays
    if features.dtype != proto.DTYPES["float32"] or features.ndim != 2:
        raise proto.ProtocolError(f"array 'features' must be float32 with 2 dimensions, got "
                                  f"{features.dtype.name}{list(features.shape)}")
    if labels.dtype != proto.DTYPES["int64"] or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise proto.ProtocolError(f"array 'labels' must be int64[{features.shape[0]}] (one per feature row), got "
                                  f"{labels.dtype.name}{list(labels.shape)}")
    return features, labels


def _selection_reply(chosen, values: np.ndarray) -> tuple[dict, list[np.ndarray]]:
    """A select-with-rows reply: active int64[S], local int64[B], values float32[S, dim][, logit_adjust float32[S]]."""
    arrays = [chosen.active.astype(np.int64), chosen.local.astype(np.int64), values]
    if chosen.logit_adjust is not None:
        arrays.append(np.asarray(chosen.logit_adjust, dtype=np.float32))
    return {"logit_adjust": chosen.logit_adjust is not None}, arrays


def _name(header: dict, key: str = "matrix") -> str:
    value = proto.field_of(header, key, str)
    if not value or len(value) > 128:
        raise proto.ProtocolError(f"header field '{key}' must be a non-empty string of at most 128 characters")
    return value


def _step(header: dict, required: bool) -> int | None:
    step = proto.field_of(header, "step", int, ... if required else None)
    if step is not None and not -(2**62) < step < 2**62:
        raise proto.ProtocolError(f"header field 'step' {step} is out of range")
    return step


class ParamServer:
    """A ROUTER socket in front of an :class:`InProcessStore` (one shard of the matrices).

    ``shared_memory``: accept same-host clients' segments (op ``shm``); at most
    ``max_segments`` are mapped (the least recently used goes first) and one unused for
    ``segment_idle_s`` is dropped (its client re-attaches when it comes back).
    """

    def __init__(self, store: InProcessStore, endpoint: str, *, secret: bytes | None = None,
                 max_message_bytes: int = 1 << 30, peers: Sequence[str] = (), shared_memory: bool = True,
                 max_segments: int = 64, segment_idle_s: float = 600.0, segment_folder: str | None = None) -> None:
        from hfs.paramserver import shm

        self.store = store
        self.secret = secret or None
        self.max_message_bytes = max_message_bytes
        self.peers = list(peers)
        self.stats = OpStats()
        self.shared_memory = shared_memory
        self.max_segments = max_segments
        self.segment_idle_s = segment_idle_s
        self.segment_folder = segment_folder or shm.segment_folder()
        self._segments: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self._waiting: list[_Waiting] = []
        self._stop = threading.Event()
        self._handlers: dict[str, Callable[[proto.Message, list], tuple[dict, list] | None]] = {
            op: getattr(self, f"_op_{op}") for op in proto.OPS}
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A hard per-frame ceiling so one huge frame cannot exhaust memory; totals between
        # max_message_bytes and this ceiling get a proper error reply.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + (1 << 20))
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            self._ctx.term()
            raise HfsError(f"cannot listen on {endpoint}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- loop -----------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_forever(self, poll_ms: int = 100) -> None:
        """Serve until stop() or a `shutdown` op; deferred gets then get an error reply."""
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        log.info("serving on %s (shard %d of %d; snapshots in %s; %s)", self.endpoint, self.store.shard.index,
                 self.store.shard.count, self.store.snapshot_dir or "nowhere",
                 "HMAC-signed messages" if self.secret else "no authentication")
        while not self._stop.is_set():
            deadline = self.store.next_deadline()
            wait_ms = poll_ms if deadline is None else max(0, min(poll_ms, int((deadline - time.monotonic()) * 1e3) + 1))
            if poller.poll(wait_ms):
                for _ in range(256):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._housekeeping()
        for waiting in self._waiting:
            self._send(waiting.envelope, proto.error_reply(waiting.request_id, "server is shutting down"), ())
        self._waiting.clear()
        for key in list(self._segments):
            self._drop_segment(key)

    def close(self, linger_ms: int = 2000) -> None:
        """Close the socket, giving queued replies (e.g. to `shutdown`) up to ``linger_ms`` to leave."""
        self._sock.close(linger=linger_ms)
        self._ctx.term()

    def _housekeeping(self) -> None:
        try:
            self.store.tick()
        except HfsError as exc:
            log.error("periodic snapshot failed: %s", exc)
        if self._waiting:
            self._serve_waiting()
        self._expire_segments()

    # -- shared memory, per connection ----------------------------------------------
    def _segment(self, envelope: list):
        """The segment this connection attached (marked as used now), or None."""
        key = bytes(envelope[0]) if envelope else b""
        segment = self._segments.get(key)
        if segment is not None:
            segment.last_used = time.monotonic()
            self._segments.move_to_end(key)
        return segment

    def _drop_segment(self, key: bytes) -> None:
        segment = self._segments.pop(key, None)
        if segment is not None:
            segment.close()

    def _expire_segments(self, now: float | None = None) -> None:
        """Unmap segments unused for segment_idle_s (their client left, or idles and will re-attach)."""
        now = time.monotonic() if now is None else now
        for key in [k for k, seg in self._segments.items() if now - seg.last_used > self.segment_idle_s]:
            log.debug("dropping an idle shared-memory segment")
            self._drop_segment(key)

    def _reply_out(self, envelope: list, n: int, dim: int) -> np.ndarray | None:
        """Where a float32 (n, dim) reply can be written in the connection's reply region, or None."""
        segment = self._segments.get(bytes(envelope[0])) if envelope else None
        return None if segment is None else segment.region(segment.reply_offset, segment.size, n, dim)

    # -- one message ----------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        started = time.perf_counter()
        # DEALER clients send [header, ...]; REQ clients put an empty delimiter first.
        split = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1
        envelope, body = frames[:split], frames[split:]
        self.stats.bytes_in += sum(len(f) for f in body)
        op, request_id, ok = "invalid", None, False
        try:
            msg = proto.decode(body, self.secret, self.max_message_bytes, segment=self._segment(envelope))
            request_id = msg.header.get("id")
            self.stats.shm_bytes_in += sum(a.nbytes for a, shared in zip(msg.arrays, msg.in_segment) if shared)
            if not fits(request_id, int):
                raise proto.ProtocolError("header field 'id' must be an integer")
            op = proto.field_of(msg.header, "op", str)
            handler = self._handlers.get(op)
            if handler is None:
                op = "invalid"
                raise proto.ProtocolError(f"unknown op {msg.header.get('op')!r} (known: {', '.join(proto.OPS)})")
            result = handler(msg, envelope)
            if result is None:  # deferred until its step is applied
                return
            if result is _ANSWERED:  # the handler sent its reply itself, before finishing its work
                ok = True
                return
            header, arrays = result
            self._send(envelope, {"id": request_id, "ok": True, **header}, arrays)
            ok = True
            if op in ("push", "leave", "restore") and self._waiting:
                self._serve_waiting()
        except HfsError as exc:
            request_id = request_id if request_id is not None else proto.peek_id(body)
            # An authentication error goes out unsigned so a client without the secret can read it.
            unsigned = isinstance(exc, proto.ProtocolError) and str(exc).startswith("authentication failed")
            self._send(envelope, proto.error_reply(request_id, str(exc)), (), sign=not unsigned)
        except Exception as exc:  # never let a message stop the server
            log.exception("internal error handling op %s", op)
            self._send(envelope, proto.error_reply(request_id, f"internal error: {exc.__class__.__name__}: {exc}"), ())
        finally:
            self.stats.record(op, time.perf_counter() - started, ok)

    def _send(self, envelope: list, header: dict, arrays: Sequence[np.ndarray], sign: bool = True) -> None:
        segment = self._segments.get(bytes(envelope[0])) if arrays and envelope else None
        if segment is not None:  # into the reply region (rows written there by the store stay put)
            arrays = segment.place(arrays, segment.reply_offset, segment.size, all_or_none=False)
            self.stats.shm_bytes_out += sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays
                                            if isinstance(a, proto.InSegment))
        frames = proto.encode(header, arrays, self.secret if sign else None)
        self.stats.bytes_out += sum(memoryview(f).nbytes for f in frames)
        self._sock.send_multipart(envelope + frames, copy=False)

    def _serve_waiting(self) -> None:
        still = []
        for w in self._waiting:
            try:
                answer = w.attempt()
            except HfsError as exc:
                self._send(w.envelope, proto.error_reply(w.request_id, str(exc)), ())
                self.stats.record(w.op, time.perf_counter() - w.started, False)
                continue
            if answer is None:
                still.append(w)
                continue
            header, arrays = answer
            self._send(w.envelope, {"id": w.request_id, "ok": True, **header}, arrays)
            self.stats.record(w.op, time.perf_counter() - w.started, True)
        self._waiting = still

    def _answer_or_wait(self, msg, envelope, op: str, attempt: Callable[[], tuple[dict, list] | None]):
        """Answer now, or keep the request until its step is applied (``attempt`` must own its arrays then)."""
        answer = attempt()
        if answer is None:
            self._waiting.append(_Waiting(envelope, msg.header["id"], time.perf_counter(), op, attempt))
        return answer

    # -- ops --------------------------------------------------------------------------
    def _op_ping(self, msg, envelope):
        return {"shard": self.store.shard.index, "num_shards": self.store.shard.count, "peers": self.peers,
                "protocol": proto.PROTOCOL_VERSION, "step_timeout_s": self.store.timeout_s,
                "auth": bool(self.secret), "matrices": self.store.matrices(),
                "snapshot_dir": self._served_snapshot_dir()}, []

    def _served_snapshot_dir(self) -> str:
        """The --snapshot-dir this server was started with (shards keep sub-folders of it)."""
        folder = self.store.snapshot_dir
        if folder is None:
            return ""
        return str(folder.parent if self.store.shard.count > 1 else folder)

    def _op_register(self, msg, envelope):
        self.store.register(_name(msg.header, "worker"))
        return {"workers": self.store.workers()}, []

    def _op_leave(self, msg, envelope):
        self.store.leave(_name(msg.header, "worker"))
        return {"workers": self.store.workers()}, []

    def _op_create(self, msg, envelope):
        h = msg.header
        _arrays(msg, [])
        # the fields' types are checked here, their ranges by the store (MatrixSpec)
        self.store.create(_name(h), proto.field_of(h, "rows", int), proto.field_of(h, "dim", int),
                          init=proto.field_of(h, "init", str, "gaussian"), std=proto.field_of(h, "std", float, 0.01),
                          seed=proto.field_of(h, "seed", int, 0), exist_ok=proto.field_of(h, "exist_ok", bool, False),
                          update_rule=proto.field_of(h, "update_rule", str, None))
        return {}, []

    def _op_get(self, msg, envelope):
        h = msg.header
        name, step = _name(h), _step(h, required=False)
        if msg.arrays:
            (rows,) = _arrays(msg, [("rows", "int64", 1)])
            dim = self.store.shape(name)[1]

            def read(answer):
                return self.store.try_get_rows(name, rows, step, out=self._reply_out(envelope, rows.size, dim),
                                               answer=None if answer is None else lambda values: answer({}, [values]))

            if self._answered_early(msg, envelope, "get", read):
                return _ANSWERED
            rows = np.array(rows)  # the frame's buffer is not ours to keep

            def attempt():
                found = read(None)
                return None if found is None else ({}, [found])
        else:
            span = (proto.field_of(h, "start", int), proto.field_of(h, "stop", int))

            def attempt():
                found = self.store.try_get_range(name, *span, step=step)
                return None if found is None else ({}, [found])
        return self._answer_or_wait(msg, envelope, "get", attempt)

    def _answered_early(self, msg, envelope, op: str, read: Callable[[Callable | None], Any]) -> bool:
        """Answer a get or select now if its step allows: ``read(answer)`` is the store call, which
        hands ``answer`` the reply (header, arrays) as soon as the rows' values are known, so any
        work the store does after it overlaps the client's next move instead of delaying this
        reply. False: the step is not applied yet (nothing was sent)."""
        sent = []

        def answer(header: dict, arrays: list) -> None:
            self._send(envelope, {"id": msg.header["id"], "ok": True, **header}, arrays)
            sent.append(True)

        try:
            read(answer)
        except Exception:
            if not sent:
                raise
            log.exception("a %s failed after its reply went out", op)  # one reply per request
        return bool(sent)

    def _op_index(self, msg, envelope):
        from hfs.samplers.owned import IndexSpec

        _arrays(msg, [])
        spec = IndexSpec.from_json(msg.header.get("spec"))
        attached = self.store.attach_index(_name(msg.header), spec)
        return {"attached": attached}, []

    def _op_select(self, msg, envelope):
        h = msg.header
        features, labels = _select_arrays(msg)
        name, step = _name(h), _step(h, required=True)
        k = proto.field_of(h, "k", int)
        with_rows = proto.field_of(h, "rows", bool, True)
        if with_rows:
            from hfs.samplers.shards import rule_from_fields

            rule = rule_from_fields(h.get("rule"))

            def select(answer):
                return self.store.try_select(name, features, labels, step, rule, k, with_rows=True, answer=(
                    None if answer is None else lambda chosen, values: answer(*_selection_reply(chosen, values))))

            if self._answered_early(msg, envelope, "select", select):
                return _ANSWERED
        features, labels = np.array(features), np.array(labels)  # kept while the request may wait

        def attempt():
            if not with_rows:
                found = self.store.try_search(name, features, k, step)
                return None if found is None else ({}, list(found))
            found = select(None)
            return None if found is None else _selection_reply(*found)
        return self._answer_or_wait(msg, envelope, "select", attempt)

    def _op_set(self, msg, envelope):
        rows, values = _arrays(msg, [("rows", "int64", 1), ("values", "float32", 2)])
        self.store.set_rows(_name(msg.header), rows, values)
        return {}, []

    def _op_push(self, msg, envelope):
        h = msg.header
        rows, grads = _arrays(msg, [("rows", "int64", 1), ("grads", "float32", 2)])
        worker = proto.field_of(h, "worker", str, None)
        # frames are ours to keep while the step waits; the client reuses its segment's request region
        self.store.push_grads(_name(h), rows, grads, _step(h, required=True), worker=worker,
                              copy=any(msg.in_segment))
        return {}, []

    def _op_shm(self, msg, envelope):
        from hfs.paramserver import shm

        _arrays(msg, [])
        if not self.shared_memory:
            raise proto.ProtocolError("shared memory is off on this server (paramserver.shared_memory)")
        segment = shm.open_offered(msg.header, self.segment_folder)
        key = bytes(envelope[0])
        self._drop_segment(key)
        self._segments[key] = segment
        while len(self._segments) > self.max_segments:
            self._drop_segment(next(iter(self._segments)))
        return {"attached": True}, []

    def _op_detach(self, msg, envelope):
        _arrays(msg, [])
        key = bytes(envelope[0]) if envelope else b""
        detached = key in self._segments
        self._drop_segment(key)
        return {"detached": detached}, []

    def _op_hparams(self, msg, envelope):
        h = msg.header
        _arrays(msg, [])
        hp = HParams(proto.field_of(h, "lr", float), proto.field_of(h, "momentum", float, 0.9),
                     proto.field_of(h, "weight_decay", float, 0.0))
        self.store.set_hparams(_name(h), hp)
        return {}, []

    def _op_snapshot(self, msg, envelope):
        tag = proto.field_of(msg.header, "tag", str, None)
        name = self.store.snapshot(tag or None)
        return {"name": name, "step": self.store.step}, []

    def _op_restore(self, msg, envelope):
        step = self.store.restore(proto.field_of(msg.header, "tag", str, "latest"))
        return {"step": step}, []

    def _op_stats(self, msg, envelope):
        return {"stats": {"server": self.stats.summary(), "store": self.store.stats(),
                          "waiting": len(self._waiting), "shm_segments": len(self._segments)}}, []

    def _op_shutdown(self, msg, envelope):
        log.info("shutdown requested by a client")
        self.stop()
        return {}, []
