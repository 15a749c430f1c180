"""The ZeroMQ client: the WeightStore interface over the wire, shard-aware.

``address`` lists every shard (``tcp://h:p0,tcp://h:p1``), or names one shard of a group
started by ``hfs serve-params --shards N``, whose ``ping`` reply lists its peers. Each
matrix is split by rows in contiguous ranges (shard i owns ``[C*i//N, C*(i+1)//N)``), so
the client routes rows itself and talks to all shards in parallel: one DEALER socket per
shard (per calling thread), send every request, then collect every reply.

With ``shared_memory="auto"`` each socket whose server accepts it (same host) gets its own
shared-memory segment (:mod:`hfs.paramserver.shm`): the arrays of get/set/push/select
requests and their replies travel through it and only headers through ZeroMQ. A server
that cannot map it (another host, or one started with ``shared_memory: off``) gets frames.

With ``pipeline_pushes`` (the default) ``push_grads`` sends its pushes and returns without
waiting for their replies: each socket's pending push reply is collected by the next request
on that socket (in the same wait as that request's own reply), by :meth:`ParamClient.flush`,
or by ``close()``. A failed push raises ``ServerError`` from the call that collects it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from hfs.paramserver import protocol as proto
from hfs.paramserver import shm
from hfs.paramserver.base import HParams, WeightStore
from hfs.paramserver.sharding import row_bounds
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

#: ops whose arrays (and replies' arrays) go through a socket's shared-memory segment
SHM_OPS = ("get", "set", "push", "select")
SHARED_MEMORY_MODES = ("auto", "off")


class ServerError(HfsError):
    """The server answered with an error (bad request, failed step, ...)."""


#: how long close() waits for each shard to confirm it dropped the connection's segment
DETACH_TIMEOUT_S = 2.0


@dataclass
class _Pending:
    """A push sent without waiting for its reply (one at most per socket)."""

    request_id: int
    step: int
    header: dict
    carried: list  # the arrays as sent when they lie in the request region (``proto.InSegment``; else [])
    region_end: int  # end of its arrays in the segment's request region (0: none there)


def parse_address(address: str | Sequence[str]) -> list[str]:
    """``tcp://h:p[,tcp://h:p...]`` (or a list of them) -> endpoints; anything else is an error naming the piece."""
    pieces = address.split(",") if isinstance(address, str) else address
    endpoints = [a.strip() for a in pieces if a.strip()]
    if not endpoints:
        raise HfsError("paramserver.address is empty: give tcp://host:port of `hfs serve-params`")
    for ep in endpoints:
        if not ep.startswith("tcp://") or ":" not in ep[6:] or not ep.rsplit(":", 1)[1].isdigit():
            raise HfsError(f"paramserver.address entry {ep!r} is not of the form tcp://host:port")
    return endpoints


def _grown(current: int, need: int, cap: int) -> int:
    """A region size for ``need`` bytes (<= ``cap``): the current one if it fits, else at least double it."""
    if need <= current:
        return current
    return min(max(need, 2 * current, shm.DEFAULT_REGION_BYTES), cap)


def _owned(array: np.ndarray) -> np.ndarray:
    """A reply array the caller may modify: received zmq frames are writable, so no copy is needed."""
    return array if array.flags.writeable else array.copy()


def _peer_for(peer: str, contacted: str) -> str:
    """A peer advertised with a wildcard host is reached at the host we contacted."""
    host = peer[6:].rsplit(":", 1)[0]
    if host in ("0.0.0.0", "*", "[::]"):
        return f"{contacted.rsplit(':', 1)[0]}:{peer.rsplit(':', 1)[1]}"
    return peer


class ParamClient(WeightStore):
    """Talks to one or more `hfs serve-params` shards; safe to use from several threads."""

    def __init__(self, address: str | Sequence[str], *, timeout_s: float = 60.0, connect_timeout_s: float = 10.0,
                 secret: bytes | None = None, shared_memory: str = "auto", pipeline_pushes: bool = True,
                 resume_hint: str = "") -> None:
        import zmq

        if shared_memory not in SHARED_MEMORY_MODES:
            raise HfsError(f"paramserver.shared_memory must be one of {', '.join(SHARED_MEMORY_MODES)}, "
                           f"got {shared_memory!r}")
        self.shared_memory = shared_memory
        self.pipeline_pushes = bool(pipeline_pushes)
        self._all_pending: list[list[list[_Pending]]] = []  # every thread's per-shard pending pushes
        self._all_segments: list = []
        self._no_shm: set[str] = set()  # endpoints that refused a segment (said once, at INFO)
        self._zmq = zmq
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.secret = secret or None
        self.endpoints = parse_address(address)
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._sockets_lock = threading.Lock()
        self._all_sockets: list = []
        self._ids = itertools.count(1)
        self._worker: str | None = None
        self._shapes: dict[str, tuple[int, int]] = {}
        self._index_specs: dict[str, Any] = {}  # what attach_index sent: the metric and freshness of its answers
        self._answered: set[str] = set()
        self._closed = False
        self._counts: collections.Counter = collections.Counter()
        self._bytes = {"sent": 0, "received": 0}
        self._latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=4096))
        self.step_timeout_s = timeout_s
        self.warn_after_s = 3.0  # a request unanswered this long is reported while it waits
        self.resume_hint = resume_hint  # the command that continues the run, named when the server is lost
        self._serve_hint = {"snapshot_dir": ""}
        try:
            self._discover()
        except BaseException:
            self.close()
            raise

    # -- connection -------------------------------------------------------------------
    def _discover(self) -> None:
        first = self._call([(0, {"op": "ping"}, [])], self.connect_timeout_s)[0].header
        if len(self.endpoints) == 1 and first.get("num_shards", 1) > 1:
            peers = first.get("peers") or []
            if len(peers) != first["num_shards"]:
                raise HfsError(f"{self.endpoints[0]} is shard {first.get('shard')} of {first['num_shards']} but does "
                               "not list its peers: give every shard in paramserver.address")
            contacted = self.endpoints[0]
            self.endpoints = [_peer_for(p, contacted) for p in peers]
            self._reset_sockets()
            infos = self._call([(i, {"op": "ping"}, []) for i in range(len(self.endpoints))], self.connect_timeout_s)
        elif len(self.endpoints) > 1:
            infos = self._call([(i, {"op": "ping"}, []) for i in range(len(self.endpoints))], self.connect_timeout_s)
        else:
            infos = None
        headers = [m.header for m in infos] if infos else [first]
        for i, h in enumerate(headers):
            if (h.get("shard"), h.get("num_shards")) != (i, len(self.endpoints)):
                raise HfsError(f"{self.endpoints[i]} reports shard {h.get('shard')} of {h.get('num_shards')}, "
                               f"expected shard {i} of {len(self.endpoints)} (order paramserver.address by shard)")
        self.step_timeout_s = max(float(h.get("step_timeout_s", 0.0)) for h in headers)
        self._serve_hint = {"snapshot_dir": headers[0].get("snapshot_dir", "")}
        self._remember_shapes(headers[0].get("matrices", {}))
        log.info("connected to parameter server %s", ",".join(self.endpoints))

    def _remember_shapes(self, matrices: dict) -> None:
        for name, info in matrices.items():
            self._shapes[name] = (int(info["rows"]), int(info["dim"]))

    def _sockets(self) -> list:
        socks = getattr(self._local, "sockets", None)
        if socks is None or len(socks) != len(self.endpoints):
            socks = self._local.sockets = [self._open(ep) for ep in self.endpoints]
            self._local.segments = [None] * len(socks)
            self._local.reply_bytes = [shm.DEFAULT_REGION_BYTES] * len(socks)
            self._local.region_cap = [shm.MAX_REGION_BYTES] * len(socks)
            self._local.pending = [[] for _ in socks]
            with self._sockets_lock:
                self._all_pending.append(self._local.pending)
        return socks

    @property
    def pipelines_pushes(self) -> bool:
        return self.pipeline_pushes

    # -- shared memory, one segment per socket ------------------------------------------
    def _carried(self, shard: int, op: str, arrays: Sequence[np.ndarray]) -> Sequence[Any]:
        """The request's arrays as the wire will carry them: placed in the socket's segment when
        there is (or can be) one and they fit, else as frames.

        A pending push's gradients stay in the request region until the server has read them:
        the next request's arrays go after them when they fit; otherwise (or when the request
        would not go through the segment at all) the push's reply is collected first, so a
        push the server could not read (its segment dropped) is sent again before this request.
        """
        if self._local.pending[shard] and not self._can_follow(shard, op, arrays):
            self._collect([shard], self.timeout_s)
        if self.shared_memory == "off" or op not in SHM_OPS:
            return arrays
        arrays = [np.ascontiguousarray(a) for a in arrays]
        start = max([p.region_end for p in self._local.pending[shard]] + [shm.DATA_OFFSET])
        if start > shm.DATA_OFFSET:  # _can_follow said they fit after the pending push
            return self._local.segments[shard].place_request(arrays, start)
        segment = self._segment_for(shard, shm.request_nbytes(arrays), op)
        placed = segment.place_request(arrays) if segment is not None else None
        return arrays if placed is None else placed

    def _can_follow(self, shard: int, op: str, arrays: Sequence[np.ndarray]) -> bool:
        """Whether a request may be sent while this socket's push is pending: always when the
        push went as frames (ZeroMQ keeps the order); when it lies in the segment, only if this
        request's arrays fit after it in the same segment (then both meet a dropped segment
        alike, and are sent again in order)."""
        ends = [p.region_end for p in self._local.pending[shard] if p.region_end]
        if not ends:
            return True
        segment = self._local.segments[shard]
        if self.shared_memory == "off" or op not in SHM_OPS or not arrays or segment is None:
            return False
        if min(self._local.reply_bytes[shard], self._local.region_cap[shard]) > segment.reply_bytes:
            return False  # the segment is about to be replaced by a bigger one
        need = sum(shm.request_nbytes([np.asarray(a)]) for a in arrays)
        return max(ends) + need <= segment.reply_offset

    def _segment_for(self, shard: int, need: int, op: str) -> shm.ClientSegment | None:
        """This thread's segment for ``shard``, attached (or re-attached bigger) as needed; None: frames."""
        if self.endpoints[shard] in self._no_shm:
            return None
        current = self._local.segments[shard]
        cap = self._local.region_cap[shard]
        need = need if need <= cap else 0  # too big for any segment: this request goes as frames
        need_reply = min(self._local.reply_bytes[shard], cap)
        if current is not None and need <= current.request_bytes and need_reply <= current.reply_bytes:
            return current
        request = _grown(current.request_bytes if current is not None else 0, need, cap)
        reply = _grown(current.reply_bytes if current is not None else 0, need_reply, cap)
        return self._attach(shard, request, reply, op)

    def _attach(self, shard: int, request_bytes: int, reply_bytes: int, op: str) -> shm.ClientSegment | None:
        """Offer a fresh segment to the shard (op ``shm``, before the ``op`` request that needs it,
        which an unreachable server's error names); unlinked once answered, either way. When a
        bigger segment cannot be made, the current one stays and bigger payloads go as frames."""
        endpoint, current = self.endpoints[shard], self._local.segments[shard]
        try:
            segment = shm.ClientSegment.create(request_bytes, reply_bytes)
        except OSError as exc:
            why = f"cannot create a segment of {request_bytes + reply_bytes} bytes in {shm.segment_folder()}: " \
                  f"{exc.strerror or exc}"
            if current is None:
                self._refuse(endpoint, why)
                return None
            log.info("%s; keeping the current one, bigger arrays go as ZeroMQ frames", why)
            self._local.region_cap[shard] = min(current.request_bytes, current.reply_bytes)
            return current
        try:
            self._call([(shard, dict({"op": "shm"}, **segment.offer.fields()), [])], label=op)
        except ServerError as exc:
            segment.close()
            self._drop_segment(shard)
            self._refuse(endpoint, str(exc))
            return None
        except BaseException:
            segment.close()
            raise
        segment.unlink()  # both sides have it mapped: nothing to leak in the folder any more
        self._drop_segment(shard)  # the server replaced it with the new one
        self._local.segments[shard] = segment
        with self._sockets_lock:
            self._all_segments.append(segment)
        return segment

    def _refuse(self, endpoint: str, why: str) -> None:
        if endpoint not in self._no_shm:
            self._no_shm.add(endpoint)
            log.info("shared memory with %s is not possible (%s); arrays go as ZeroMQ frames", endpoint, why)

    def _drop_segment(self, shard: int) -> None:
        segments = getattr(self._local, "segments", None)
        segment = segments[shard] if segments else None
        if segment is None:
            return
        segments[shard] = None
        with self._sockets_lock:
            if segment in self._all_segments:
                self._all_segments.remove(segment)
        segment.close()

    def _note_reply(self, shard: int, msg: proto.Message, copy_out: bool) -> None:
        """Copy arrays out of the segment (the caller owns its arrays; the next reply reuses the
        region), and grow the reply region when a reply had to come as frames."""
        if copy_out:
            msg.arrays = [a.copy() if shared else a for a, shared in zip(msg.arrays, msg.in_segment)]
        segment = self._local.segments[shard]
        if segment is not None and not all(msg.in_segment):
            total = shm.request_nbytes(msg.arrays)
            if segment.reply_bytes < total <= self._local.region_cap[shard]:
                self._local.reply_bytes[shard] = total

    def _open(self, endpoint: str):
        if self._closed:
            raise HfsError("the parameter-server client is closed")
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        # No ZMQ_IMMEDIATE: with it, a reply that arrived just before the server closed (the
        # answer to `shutdown`) is dropped with the connection. Requests queued for a server
        # that never answers are dropped instead by replacing the socket after the timeout.
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        with self._sockets_lock:
            self._all_sockets.append(sock)
        return sock

    def _replace_socket(self, shard: int) -> None:
        """After a timeout, drop the socket (and any late reply or queued request) for a fresh one."""
        socks = self._sockets()
        old = socks[shard]
        with self._sockets_lock:
            if old in self._all_sockets:
                self._all_sockets.remove(old)
        old.close(0)
        self._drop_segment(shard)  # a late reply of the old socket may still be written into it
        for pending in self._local.pending[shard]:
            log.warning("the push for step %d to %s was sent but not confirmed (the call failed before its "
                        "reply came)", pending.step, self.endpoints[shard])
        self._local.pending[shard].clear()
        socks[shard] = self._open(self.endpoints[shard])

    def _reset_sockets(self) -> None:
        """Close this thread's sockets (the endpoint list changed)."""
        for shard, sock in enumerate(getattr(self._local, "sockets", None) or []):
            with self._sockets_lock:
                if sock in self._all_sockets:
                    self._all_sockets.remove(sock)
            sock.close(0)
            self._drop_segment(shard)
        self._local.sockets = None
        with self._sockets_lock:
            pending = getattr(self._local, "pending", None)
            self._all_pending = [p for p in self._all_pending if p is not pending]

    # -- one round of requests ----------------------------------------------------------
    def _call(self, requests: Sequence[tuple[int, dict, Sequence[np.ndarray]]], timeout_s: float | None = None,
              *, copy_out: bool = True, retry: bool = True, label: str | None = None,
              defer: bool = False) -> list[proto.Message]:
        """Send one request to each named shard, then wait for all replies (in request order).

        ``copy_out`` False: reply arrays may be views of the shared-memory segment, valid until
        this thread's next call. A shard that lost its segment (the server dropped an idle one)
        gets its request again once, through a new segment or frames. ``label``: the op that
        errors name (the request a handshake is made for). ``defer`` (pushes): send only and
        return []; each reply is collected later by the next request on its socket, ``flush``
        or ``close``. A push pending on a socket is answered before that socket's next request:
        each shard is single-threaded and ZeroMQ keeps a connection's order, so a request sent
        after a push always sees the push applied.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        socks = self._sockets()
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        waiting: dict[int, int | None] = {}
        replies: dict[int, proto.Message] = {}
        lost_pushes: list[tuple[int, _Pending]] = []
        op = requests[0][1]["op"]
        try:
            for shard, header, arrays in requests:
                request_id = self._send(shard, header, arrays, socks, deadline, timeout_s, label or op, defer)
                if not defer:
                    waiting[shard] = request_id
            self._receive(socks, waiting, replies, lost_pushes, started, deadline, timeout_s, copy_out, label or op)
        except BaseException:
            # A request left unanswered must never be answered into a later call, nor read its
            # arrays from a shared-memory region a later request reuses: fresh sockets and segments.
            for shard in waiting:
                if not self._settled(shard, waiting, replies) and not self._closed:
                    self._replace_socket(shard)
            raise
        self._counts[op] += 1
        self._latency[op].append(time.perf_counter() - started)
        self._send_again(lost_pushes, timeout_s)  # before any request that followed them
        if defer:
            return []
        out = [replies[shard] for shard, _, _ in requests]
        lost = [i for i, (shard, _, _) in enumerate(requests) if self._lost_segment(shard, out[i])]
        if lost and retry:
            again = self._call([requests[i] for i in lost], timeout_s, copy_out=copy_out, retry=False)
            for i, msg in zip(lost, again):
                out[i] = msg
        for shard, msg in zip(waiting, out):
            if not msg.header.get("ok"):
                raise ServerError(f"parameter server {self.endpoints[shard]}: {msg.header.get('error')}")
        return out

    def _send(self, shard: int, header: dict, arrays: Sequence[np.ndarray], socks: list, deadline: float,
              timeout_s: float, label: str, defer: bool) -> int:
        """Send one request; a deferred one is remembered as the socket's pending push. Returns its id."""
        if defer and self._local.pending[shard]:
            self._collect([shard], timeout_s)  # at most one pending push per socket
        request_id = next(self._ids)
        carried = list(self._carried(shard, header["op"], arrays))
        frames = proto.encode(dict(header, id=request_id), carried, self.secret)
        sock = socks[shard]
        if not sock.poll(max(0, int((deadline - time.monotonic()) * 1e3)), self._zmq.POLLOUT):
            self._replace_socket(shard)
            raise HfsError(self._unreachable(shard, label, timeout_s, connected=False))
        # A deferred push returns before ZeroMQ has sent it: its frames are copied, so the
        # caller may reuse its arrays at once (arrays in the segment are copies already).
        sock.send_multipart(frames, copy=defer)
        self._bytes["sent"] += sum(memoryview(f).nbytes for f in frames)
        if defer:
            ends = [shm.aligned(a.offset + math.prod(a.shape) * a.dtype.itemsize)
                    for a in carried if isinstance(a, proto.InSegment)]
            # only arrays in the segment are kept: a push the server could not read is sent again from them
            self._local.pending[shard].append(_Pending(request_id, int(header.get("step", -1)), dict(header),
                                                       carried if ends else [], max(ends, default=0)))
        return request_id

    def _settled(self, shard: int, waiting: dict, replies: dict) -> bool:
        """This shard's reply is in (or none is awaited) and its socket has no pending push left."""
        return (waiting[shard] is None or shard in replies) and not self._local.pending[shard]

    def _receive(self, socks: list, waiting: dict, replies: dict, lost_pushes: list, started: float,
                 deadline: float, timeout_s: float, copy_out: bool, label: str) -> None:
        """Collect every reply into ``replies`` (``waiting``: shard -> id sent, None: only the
        socket's pending push), each socket's pending push reply first, as ZeroMQ delivers them."""
        zmq = self._zmq
        pending = self._local.pending
        poller = zmq.Poller()
        for shard in waiting:
            poller.register(socks[shard], zmq.POLLIN)
        warn_at = self.warn_after_s
        while True:
            open_shards = [s for s in waiting if not self._settled(s, waiting, replies)]
            if not open_shards:
                return
            remaining = deadline - time.monotonic()
            waited = time.perf_counter() - started
            slice_s = min(remaining, max(warn_at - waited, 0.01))
            ready = dict(poller.poll(max(0, int(slice_s * 1e3)))) if remaining > 0 else {}
            if not ready and remaining > slice_s:
                warn_at = self._warn_waiting(open_shards[0], warn_at)
                continue
            if not ready:
                missing = open_shards[0]
                what = f"push for step {pending[missing][0].step}" if pending[missing] else label
                raise HfsError(self._unreachable(missing, what, timeout_s,
                                                 connected=self.endpoints[missing] in self._answered))
            for shard in open_shards:
                if socks[shard] not in ready:
                    continue
                frames = socks[shard].recv_multipart(copy=False)
                self._bytes["received"] += sum(len(f) for f in frames)
                msg = self._decode_reply(shard, frames)
                reply_id = msg.header.get("id")
                # Sockets are replaced after a timeout, so a reply here answers this socket's
                # pending push or this request; the id check guards anyway (an error reply to an
                # undecodable request has none).
                if pending[shard] and reply_id in (pending[shard][0].request_id, None):
                    self._answered.add(self.endpoints[shard])
                    self._confirm(shard, pending[shard].pop(0), msg, lost_pushes)
                elif waiting[shard] is not None and reply_id in (waiting[shard], None):
                    self._note_reply(shard, msg, copy_out)
                    replies[shard] = msg
                    self._answered.add(self.endpoints[shard])

    def _confirm(self, shard: int, pending: _Pending, msg: proto.Message, lost_pushes: list) -> None:
        """A pending push's reply: fine; lost with its segment (kept to be sent again, its arrays
        copied out of the segment first); or failed: ServerError naming the push's step."""
        if msg.header.get("ok"):
            return
        error = str(msg.header.get("error", ""))
        segment = self._local.segments[shard]
        if error.startswith(proto.NO_SEGMENT_ERROR) and segment is not None and pending.region_end:
            pending.carried = [segment.array(a.dtype, a.shape, a.offset).copy() if isinstance(a, proto.InSegment)
                               else a for a in pending.carried]
            log.debug("parameter server %s dropped this socket's segment; sending the push again",
                      self.endpoints[shard])
            self._drop_segment(shard)
            lost_pushes.append((shard, pending))
            return
        raise ServerError(f"push for step {pending.step} failed: parameter server {self.endpoints[shard]}: {error}")

    def _send_again(self, lost_pushes: list[tuple[int, _Pending]], timeout_s: float) -> None:
        """Pushes the server could not read (it had dropped their segment), sent again and waited for."""
        for shard, pending in lost_pushes:
            try:
                self._call([(shard, pending.header, pending.carried)], timeout_s, retry=False)
            except ServerError as exc:
                raise ServerError(f"push for step {pending.step} failed: {exc}") from None

    def _collect(self, shards: Sequence[int], timeout_s: float) -> None:
        """Wait for the replies of the pushes pending on ``shards``' sockets."""
        socks = self._sockets()
        started = time.perf_counter()
        waiting: dict[int, int | None] = {shard: None for shard in shards}
        lost_pushes: list[tuple[int, _Pending]] = []
        try:
            self._receive(socks, waiting, {}, lost_pushes, started, time.monotonic() + timeout_s, timeout_s, True,
                          "push")
        except BaseException:
            for shard in shards:
                if self._local.pending[shard] and not self._closed:
                    self._replace_socket(shard)
            raise
        self._send_again(lost_pushes, timeout_s)

    def _lost_segment(self, shard: int, msg: proto.Message) -> bool:
        """The server no longer has this socket's segment (it dropped an idle one): forget it here too."""
        if msg.header.get("ok") or not str(msg.header.get("error", "")).startswith(proto.NO_SEGMENT_ERROR):
            return False
        log.debug("parameter server %s dropped this socket's segment; attaching again", self.endpoints[shard])
        self._drop_segment(shard)
        return True

    def _decode_reply(self, shard: int, frames: list) -> proto.Message:
        try:
            return proto.decode(frames, self.secret, segment=self._local.segments[shard])
        except proto.ProtocolError as exc:
            text = str(exc)
            if self.secret:  # the server refused our signature: its (unsigned) error says why
                try:
                    unsigned = proto.decode(frames, None)
                except proto.ProtocolError:
                    unsigned = None
                if unsigned is not None and unsigned.header.get("ok") is False:
                    raise ServerError(f"parameter server {self.endpoints[shard]}: {unsigned.header.get('error')}")
            if not self.secret and "array frame" in text:
                text += "; the server may require a shared secret (paramserver.secret or HFS_PS_SECRET)"
            raise HfsError(f"bad reply from parameter server {self.endpoints[shard]}: {text}") from None

    def _warn_waiting(self, shard: int, warn_at: float) -> float:
        """Say which server a request is waiting for, at warn_after_s and every 10 s after."""
        log.warning("waiting for the parameter server at %s (%d s)", self.endpoints[shard], round(warn_at))
        return warn_at + 10.0

    def _unreachable(self, shard: int, op: str, timeout_s: float, connected: bool) -> str:
        endpoint = self.endpoints[shard]
        if not connected:
            return f"no parameter server at {endpoint} — start one with `hfs serve-params`"
        return (f"parameter server at {endpoint} did not answer '{op}' within {timeout_s:g} s; "
                f"if it stopped, {self._recovery(endpoint)}")

    def _recovery(self, endpoint: str) -> str:
        """The commands that bring a lost server and the run back, with this run's real values."""
        serve = f"hfs serve-params --port {self.endpoints[0].rsplit(':', 1)[1]}"
        if len(self.endpoints) > 1:
            serve += f" --shards {len(self.endpoints)}"
        if self._serve_hint.get("snapshot_dir"):
            serve += f" --snapshot-dir {self._serve_hint['snapshot_dir']}"
        text = f"restart it with `{serve} --resume latest`"
        return text + (f", then continue with `{self.resume_hint}`" if self.resume_hint else "")

    def _all(self, header: dict, timeout_s: float | None = None) -> list[proto.Message]:
        return self._call([(i, header, []) for i in range(len(self.endpoints))], timeout_s)

    # -- routing ------------------------------------------------------------------------
    def _split(self, name: str, rows: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(shard, positions in ``rows``) for every shard; positions None = all rows, one shard."""
        count = len(self.endpoints)
        if count == 1:
            return [(0, None)]
        bounds = row_bounds(self.shape(name)[0], count)
        shard_of = np.searchsorted(bounds[1:-1], rows, side="right")
        order = np.argsort(shard_of, kind="stable")
        cuts = np.cumsum(np.bincount(shard_of, minlength=count))[:-1]
        return list(enumerate(np.split(order, cuts)))

    @staticmethod
    def _rows(rows: Any) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise HfsError(f"rows must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    # -- WeightStore ----------------------------------------------------------------------
    def register(self, worker: str) -> None:
        self._all({"op": "register", "worker": worker})
        self._worker = worker

    def leave(self, worker: str) -> None:
        self._all({"op": "leave", "worker": worker})
        if worker == self._worker:
            self._worker = None

    def create(self, name: str, num_rows: int, dim: int, *, init: str = "gaussian", std: float = 0.01,
               seed: int = 0, exist_ok: bool = False, update_rule: str | None = None) -> None:
        header = {"op": "create", "matrix": name, "rows": int(num_rows), "dim": int(dim), "init": init,
                  "std": float(std), "seed": int(seed), "exist_ok": bool(exist_ok)}
        if update_rule is not None:
            header["update_rule"] = update_rule
        self._all(header)
        self._shapes[name] = (int(num_rows), int(dim))

    def shape(self, name: str) -> tuple[int, int]:
        if name not in self._shapes:
            self._remember_shapes(self.ping()[0].get("matrices", {}))
        if name not in self._shapes:
            raise ServerError(f"parameter server {self.endpoints[0]}: no matrix named {name!r}")
        return self._shapes[name]

    def last_applied(self, name: str) -> int:
        """The newest step any shard applied (shards of one job apply the same steps)."""
        steps = [reply.get("matrices", {}).get(name, {}).get("last_applied") for reply in self.ping()]
        if any(step is None for step in steps):
            raise ServerError(f"parameter server {self.endpoints[0]}: no matrix named {name!r}")
        return max(int(step) for step in steps)

    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        rows = self._rows(rows)
        header = {"op": "get", "matrix": name}
        if step is not None:
            header["step"] = int(step)
        timeout = None if step is None else max(self.timeout_s, self.step_timeout_s + 5.0)
        parts = self._split(name, rows)
        if parts[0][1] is None:
            return _owned(self._call([(0, header, [rows])], timeout)[0].arrays[0])
        asked = [(s, pos) for s, pos in parts if pos.size]
        replies = self._call([(s, header, [rows[pos]]) for s, pos in asked], timeout, copy_out=False) if asked else []
        out = np.empty((rows.size, self.shape(name)[1]), dtype=np.float32)
        for (_, pos), msg in zip(asked, replies):
            out[pos] = msg.arrays[0]
        return out

    def set_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        rows = self._rows(rows)
        values = np.ascontiguousarray(values)
        parts = self._split(name, rows)
        if parts[0][1] is None:
            self._call([(0, {"op": "set", "matrix": name}, [rows, values])])
            return
        self._call([(s, {"op": "set", "matrix": name}, [rows[pos], values[pos]]) for s, pos in parts if pos.size])

    def push_grads(self, name: str, rows: np.ndarray, grads: np.ndarray, step: int, *,
                   worker: str | None = None) -> None:
        """Every shard gets a push (possibly empty) so each one can complete the step. With
        ``pipeline_pushes`` this returns once they are sent; see :meth:`flush`."""
        rows = self._rows(rows)
        grads = np.ascontiguousarray(grads)
        header = {"op": "push", "matrix": name, "step": int(step)}
        if worker or self._worker:
            header["worker"] = worker or self._worker
        parts = self._split(name, rows)
        defer = self.pipeline_pushes
        if parts[0][1] is None:
            self._call([(0, header, [rows, grads])], defer=defer)
            return
        self._call([(s, header, [rows[pos], grads[pos]]) for s, pos in parts], defer=defer)

    def flush(self) -> None:
        """Wait for the replies of this thread's pushes sent without waiting (``pipeline_pushes``);
        the first failed one raises ServerError naming its step."""
        pending = getattr(self._local, "pending", None) or []
        shards = [shard for shard, pushes in enumerate(pending) if pushes]
        if shards:
            self._collect(shards, self.timeout_s)

    def set_hparams(self, name: str, hparams: HParams) -> None:
        self._all({"op": "hparams", "matrix": name, "lr": float(hparams.lr), "momentum": float(hparams.momentum),
                   "weight_decay": float(hparams.weight_decay)})

    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        num_rows = self.shape(name)[0]
        bounds = row_bounds(num_rows, len(self.endpoints))
        for first in range(0, num_rows, max(1, int(chunk_rows))):
            stop = min(first + chunk_rows, num_rows)
            asks = []
            for shard in range(len(self.endpoints)):
                lo, hi = max(first, int(bounds[shard])), min(stop, int(bounds[shard + 1]))
                if lo < hi:
                    asks.append((shard, {"op": "get", "matrix": name, "start": lo, "stop": hi}, []))
            replies = self._call(asks)
            yield first, (_owned(replies[0].arrays[0]) if len(replies) == 1
                          else np.concatenate([m.arrays[0] for m in replies]))

    # -- the index, owned by the shards ------------------------------------------------
    def attach_index(self, name: str, spec: Any) -> bool:
        """Every shard keeps an index over its own rows (``spec``: an IndexSpec); True if any started a build."""
        replies = self._all({"op": "index", "matrix": name, "spec": spec.to_json()})
        self._index_specs[name] = spec
        return any(bool(m.header.get("attached")) for m in replies)

    def select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule: Any, k: int,
               *, with_rows: bool = True) -> tuple[Any, np.ndarray | None]:
        """One round trip to a single shard (selection and rows together); with several shards,
        every shard's candidates in parallel, merged by similarity, the rule applied here, then
        one parallel ``get`` of the active rows."""
        from hfs.samplers.registry import SAMPLERS
        from hfs.samplers.shards import merge_topk, rule_to_fields
        from hfs.samplers.selection import Selection, find_candidates, reranked

        features = np.ascontiguousarray(features, dtype=np.float32)
        labels = self._rows(labels)
        num_rows = self.shape(name)[0]
        k = int(max(0, min(int(k), num_rows)))
        header = {"op": "select", "matrix": name, "step": int(step), "k": k}
        timeout = max(self.timeout_s, self.step_timeout_s + 5.0)
        if len(self.endpoints) == 1 and with_rows:
            reply = self._call([(0, dict(header, rows=True, rule=rule_to_fields(rule)), [features, labels])],
                               timeout)[0]
            arrays = reply.arrays
            adjust = _owned(arrays[3]) if reply.header.get("logit_adjust") and len(arrays) > 3 else None
            return Selection(_owned(arrays[0]), _owned(arrays[1]), adjust), _owned(arrays[2])
        spec = self._index_specs.get(name)
        metric = spec.kwargs.get("metric", "cosine") if spec else "cosine"
        stale = spec is None or not SAMPLERS.get(spec.sampler).fresh_scores

        def search(asking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Every shard's best rows for the asking queries, merged by similarity (re-ranked under the
            current rows when the rule compares and the index answers from old ones)."""
            unlabelled = np.full(len(asking), -1, dtype=np.int64)
            replies = self._all_with(dict(header, rows=False), [asking, unlabelled], timeout)
            ids, sims = merge_topk([(m.arrays[0], m.arrays[1]) for m in replies], k)
            if ids.shape[1] and rule.needs_scorer and stale:
                ids, sims = reranked(ids, self._scorer(name, asking, metric, step)(ids))
            return ids, sims

        scorer = self._scorer(name, features, metric, step)
        ids, sims, measured = find_candidates(rule, labels, features, num_rows, int(step), search, scorer)
        chosen = rule.select(labels, ids, sims, num_rows, int(step), scorer, measured)
        return chosen, (self.get_rows(name, chosen.active, step) if with_rows else None)

    def _scorer(self, name: str, features: np.ndarray, metric: str, step: int):
        """The selection rule's scorer over the shards' rows as step ``step`` sees them (one ``get`` per call)."""
        from hfs.samplers.base import normalise_rows
        from hfs.samplers.selection import score_with_rows

        queries = normalise_rows(features) if metric == "cosine" else features

        def rows_of(ids: np.ndarray) -> np.ndarray:
            values = self.get_rows(name, ids, step)
            return normalise_rows(values) if metric == "cosine" else values

        return lambda ids: score_with_rows(queries, ids, rows_of)

    def _all_with(self, header: dict, arrays: Sequence[np.ndarray], timeout_s: float | None = None
                  ) -> list[proto.Message]:
        return self._call([(i, header, arrays) for i in range(len(self.endpoints))], timeout_s)

    def index_stats(self, name: str) -> dict:
        """Every shard's index of ``name`` (``shards``), and over all shards: builds (summed),
        drift (mean), index_ready (all), bg_share (summed)."""
        shards = [stats["store"].get("indexes", {}).get(name, {}) for stats in self.server_stats()]
        if not any(shards):
            return {}
        return {"shards": shards, "builds": sum(int(s.get("builds", 0)) for s in shards),
                "rebuilds": sum(int(s.get("builds", 0)) for s in shards),
                "drift": float(np.mean([s.get("drift", 0.0) for s in shards])),
                "index_ready": all(s.get("index_ready", False) for s in shards),
                "bg_share": float(sum(s.get("bg_share", 0.0) for s in shards)),
                "bg_cpu_seconds": float(sum(s.get("bg_cpu_seconds", 0.0) for s in shards))}

    def snapshot(self, tag: str | None = None) -> str:
        header = {"op": "snapshot"}
        if tag:
            header["tag"] = tag
        names = [m.header["name"] for m in self._all(header, max(self.timeout_s, 600.0))]
        if len(set(names)) != 1:
            raise HfsError(f"shards wrote differently named snapshots ({', '.join(names)}): their steps differ")
        return names[0]

    def restore(self, tag: str = "latest") -> int:
        steps = [int(m.header["step"]) for m in self._all({"op": "restore", "tag": tag}, max(self.timeout_s, 600.0))]
        if len(set(steps)) != 1:
            raise HfsError(f"shards restored snapshots of different steps ({', '.join(map(str, steps))}); "
                           "restore a named snapshot every shard has")
        self._shapes.clear()
        self._remember_shapes(self.ping()[0].get("matrices", {}))
        return steps[0]

    def ping(self) -> list[dict]:
        """Every shard's ping reply (shard, peers, matrices, step timeout)."""
        return [m.header for m in self._all({"op": "ping"})]

    def server_stats(self) -> list[dict]:
        return [m.header["stats"] for m in self._all({"op": "stats"})]

    def stats(self) -> dict:
        ops = {}
        for op, lat in self._latency.items():
            ms = np.asarray(lat) * 1e3
            ops[op] = {"requests": self._counts[op], "p50_ms": float(np.percentile(ms, 50)),
                       "p99_ms": float(np.percentile(ms, 99))}
        return {"client": {"endpoints": list(self.endpoints), "bytes_sent": self._bytes["sent"],
                           "bytes_received": self._bytes["received"], "ops": ops},
                "shards": self.server_stats()}

    def shutdown(self) -> None:
        """Ask every shard to take its final snapshot and stop."""
        self._all({"op": "shutdown"})
        for shard in range(len(self.endpoints)):  # a stopping server unmaps them: nothing to detach at close
            self._drop_segment(shard)

    def close(self) -> None:
        """Collect this thread's pending pushes (a failed one still raises, after the cleanup),
        ask each shard to unmap this thread's segments (best effort, briefly), release all."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            try:
                self._detach_segments()
            finally:
                self._release()

    def _detach_segments(self) -> None:
        """Tell every shard whose segment this thread holds to unmap it now, not when it expires
        (a server that does not answer within DETACH_TIMEOUT_S is left to expire it)."""
        segments = getattr(self._local, "segments", None) or []
        asks = [(shard, {"op": "detach"}, []) for shard, segment in enumerate(segments) if segment is not None]
        if not asks:
            return
        try:
            self._call(asks, DETACH_TIMEOUT_S, retry=False)
        except HfsError as exc:
            log.debug("detaching shared memory on close: %s", exc)

    def _release(self) -> None:
        self._closed = True
        with self._sockets_lock:
            unconfirmed = sum(len(pushes) for pending in self._all_pending for pushes in pending)
            if unconfirmed:  # another thread's (this one's were collected, or reported, by flush)
                log.warning("%d push(es) sent by other threads were not confirmed before close (call flush() "
                            "on the thread that pushed)", unconfirmed)
            for sock in self._all_sockets:
                sock.close(0)
            self._all_sockets.clear()
            for segment in self._all_segments:
                segment.close()
            self._all_segments.clear()
        self._ctx.term()
