"""Rounds of requests to the shards: send one request to each named shard, then collect every reply.

:class:`Transport` holds the ZeroMQ context and every thread's :class:`~hfs.paramserver.connection.Connection`
(one per shard, opened on a thread's first call). A round (:meth:`Transport.call`) sends its
requests, each through its connection's segment when it has (or can get) one, then waits for
all replies, each connection's pending push's reply first (same socket, same order). Around
that: a pushed-and-not-waited-for request (``defer``) is only sent; a push the server could not
read (it dropped an idle segment) is sent again before anything that followed it; a request
whose segment was dropped is sent again once; a connection left with an unanswered request is
replaced (new socket, no segment), so a late reply is never taken for a later one; and a
server that does not answer is named, with the commands that bring the run back.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from hfs.paramserver import protocol as proto
from hfs.paramserver import shm
from hfs.paramserver.connection import SHM_OPS, Connection, PendingPush, ServerError
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

#: how long close() waits for each shard to confirm it dropped the connection's segment
DETACH_TIMEOUT_S = 2.0

#: (shard, header, arrays): one request of a round
Request = tuple[int, dict, Sequence[Any]]


class Transport:
    """Every thread's connections to ``endpoints`` and the rounds of requests over them.

    ``shared_memory`` (auto | off): offer each connection a segment; ``recovery()``: the commands
    that bring a lost server and the run back, named when a server stops answering.
    """

    def __init__(self, endpoints: list[str], *, timeout_s: float, secret: bytes | None, shared_memory: bool,
                 recovery: Callable[[], str]) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.secret = secret
        self.shared_memory = shared_memory
        self.recovery = recovery
        self.warn_after_s = 3.0  # a request unanswered this long is reported while it waits
        self.no_shm: set[str] = set()  # endpoints that refused a segment (said once, at INFO)
        self.answered: set[str] = set()  # endpoints that ever replied: a silence there is a lost server
        self.closed = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Connection] = []  # every thread's, closed by close()
        self._ids = itertools.count(1)
        self.counts: collections.Counter = collections.Counter()
        self.bytes = {"sent": 0, "received": 0}
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=4096))

    # -- connections -------------------------------------------------------------------
    def connections(self) -> list[Connection]:
        """This thread's connection to each shard, opened on first use."""
        conns = getattr(self._local, "connections", None)
        if conns is None or len(conns) != len(self.endpoints):
            conns = [Connection(i, ep, self._socket(ep)) for i, ep in enumerate(self.endpoints)]
            self._local.connections = conns
            with self._lock:
                self._all.extend(conns)
        return conns

    def _opened(self) -> list[Connection]:
        """This thread's connections if it has any (none are opened)."""
        return getattr(self._local, "connections", None) or []

    def _socket(self, endpoint: str):
        if self.closed:
            raise HfsError("the parameter-server client is closed")
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        # No ZMQ_IMMEDIATE: with it, a reply that arrived just before the server closed (the
        # answer to `shutdown`) is dropped with the connection. Requests queued for a server
        # that never answers are dropped instead by replacing the socket after the timeout.
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _replace(self, conn: Connection) -> None:
        """After a timeout, drop the socket (and any late reply or queued request) for a fresh one."""
        conn.close()  # a late reply of the old socket may still be written into its segment
        if conn.pending is not None:
            log.warning("the push for step %d to %s was sent but not confirmed (the call failed before its "
                        "reply came)", conn.pending.step, conn.endpoint)
            conn.pending = None
        conn.sock = self._socket(conn.endpoint)

    def reset(self, endpoints: list[str]) -> None:
        """Talk to ``endpoints`` from now on: this thread's connections are closed."""
        for conn in self._opened():
            conn.close()
            with self._lock:
                self._all.remove(conn)
        self._local.connections = None
        self.endpoints = endpoints

    def drop_segments(self) -> None:
        """Forget this thread's segments without telling the servers (they are stopping)."""
        for conn in self._opened():
            conn.drop_segment()

    # -- one round of requests ---------------------------------------------------------------
    def call(self, requests: Sequence[Request], timeout_s: float | None = None, *, copy_out: bool = True,
             retry: bool = True, label: str | None = None, defer: bool = False) -> list[proto.Message]:
        """Send one request to each named shard, then wait for all replies (in request order).

        ``copy_out`` False: reply arrays may be views of the shared-memory segment, valid until
        this thread's next call. A shard that lost its segment (the server dropped an idle one)
        gets its request again once, through a new segment or frames. ``label``: the op that
        errors name (the request a handshake is made for). ``defer`` (pushes): send only and
        return []; each reply is collected later by the next request on its connection, ``flush``
        or ``close``. A push pending on a connection is answered before that connection's next
        request: each shard is single-threaded and ZeroMQ keeps a connection's order, so a
        request sent after a push always sees the push applied.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        conns = self.connections()
        op = requests[0][1]["op"]
        round_ = self._exchange(conns, requests, _Round(self, timeout_s, label or op, copy_out), defer)
        self.counts[op] += 1
        self.latency[op].append(time.perf_counter() - round_.started)
        self._send_again(round_.lost_pushes, timeout_s)  # before any request that followed them
        if defer:
            return []
        out = [round_.replies[conns[shard]] for shard, _, _ in requests]
        self._resend_lost(conns, requests, out, timeout_s, copy_out, retry)
        for (shard, _, _), msg in zip(requests, out):
            if not msg.header.get("ok"):
                raise ServerError(f"parameter server {self.endpoints[shard]}: {msg.header.get('error')}")
        return out

    def _resend_lost(self, conns: list[Connection], requests: Sequence[Request], out: list[proto.Message],
                     timeout_s: float, copy_out: bool, retry: bool) -> None:
        """Requests refused because the server had dropped their connection's segment (forgotten
        here too), sent again once with ``retry`` (through a new segment, or frames); their replies
        replace the refusals in ``out``."""
        lost = [i for i, (shard, _, _) in enumerate(requests) if conns[shard].lost_segment(out[i])]
        if lost and retry:
            again = self.call([requests[i] for i in lost], timeout_s, copy_out=copy_out, retry=False)
            for i, msg in zip(lost, again):
                out[i] = msg

    def _exchange(self, conns: list[Connection], requests: Sequence[Request], round_: "_Round",
                  defer: bool) -> "_Round":
        """Send every request of ``round_``, then receive its replies; on any failure the connections
        left waiting are replaced before the error goes on."""
        try:
            for shard, header, arrays in requests:
                request_id = self._send(conns[shard], header, arrays, round_, defer)
                if not defer:
                    round_.waiting[conns[shard]] = request_id
            round_.receive()
        except BaseException:
            round_.abandon()
            raise
        return round_

    def _send(self, conn: Connection, header: dict, arrays: Sequence[np.ndarray], round_: "_Round",
              defer: bool) -> int:
        """Send one request; a deferred one is remembered as the connection's pending push. Returns its id."""
        if defer and conn.pending is not None:
            self.collect([conn], round_.timeout_s)  # at most one pending push per connection
        request_id = next(self._ids)
        carried = list(self._carried(conn, header["op"], arrays))
        frames = proto.encode(dict(header, id=request_id), carried, self.secret)
        if not conn.sock.poll(max(0, int((round_.deadline - time.monotonic()) * 1e3)), self._zmq.POLLOUT):
            self._replace(conn)
            raise HfsError(self.unreachable(conn, round_.label, round_.timeout_s, connected=False))
        # A deferred push returns before ZeroMQ has sent it: its frames are copied, so the
        # caller may reuse its arrays at once (arrays in the segment are copies already).
        conn.sock.send_multipart(frames, copy=defer)
        self.bytes["sent"] += sum(memoryview(f).nbytes for f in frames)
        if defer:
            conn.remember_push(request_id, header, carried)
        return request_id

    def collect(self, conns: Sequence[Connection], timeout_s: float) -> None:
        """Wait for the replies of the pushes pending on ``conns``."""
        round_ = _Round(self, timeout_s, "push", copy_out=True)
        round_.waiting = {conn: None for conn in conns}
        try:
            round_.receive()
        except BaseException:
            round_.abandon()
            raise
        self._send_again(round_.lost_pushes, timeout_s)

    def flush(self) -> None:
        """Wait for the replies of this thread's pushes sent without waiting; the first failed one raises."""
        pending = [conn for conn in self._opened() if conn.pending is not None]
        if pending:
            self.collect(pending, self.timeout_s)

    def _send_again(self, lost_pushes: list[tuple[Connection, PendingPush]], timeout_s: float) -> None:
        """Pushes the server could not read (it had dropped their segment), sent again and waited for."""
        for conn, push in lost_pushes:
            try:
                self.call([(conn.shard, push.header, push.carried)], timeout_s, retry=False)
            except ServerError as exc:
                raise ServerError(f"push for step {push.step} failed: {exc}") from None

    # -- shared memory, one segment per connection ------------------------------------------
    def _carried(self, conn: Connection, op: str, arrays: Sequence[np.ndarray]) -> Sequence[Any]:
        """The request's arrays as the wire will carry them: placed in the connection's segment
        when there is (or can be) one and they fit, else as frames.

        A pending push's gradients stay in the request region until the server has read them:
        the next request's arrays go after them when they fit; otherwise (or when the request
        would not go through the segment at all) the push's reply is collected first, so a
        push the server could not read (its segment dropped) is sent again before this request.
        """
        if conn.pending is not None and not conn.can_follow(op, arrays, self.shared_memory):
            self.collect([conn], self.timeout_s)
        if not self.shared_memory or op not in SHM_OPS:
            return arrays
        arrays = [np.ascontiguousarray(a) for a in arrays]
        start = conn.after_pending()
        if start > shm.DATA_OFFSET:  # can_follow said they fit after the pending push
            return conn.segment.place_request(arrays, start)
        segment = self._segment_for(conn, shm.request_nbytes(arrays), op)
        placed = segment.place_request(arrays) if segment is not None else None
        return arrays if placed is None else placed

    def _segment_for(self, conn: Connection, need: int, op: str) -> shm.ClientSegment | None:
        """The connection's segment, attached (or re-attached bigger) as needed; None: frames."""
        if conn.endpoint in self.no_shm:
            return None
        sizes = conn.sizes_for(need)
        return conn.segment if sizes is None else self._attach(conn, *sizes, op)

    def _attach(self, conn: Connection, request_bytes: int, reply_bytes: int, op: str) -> shm.ClientSegment | None:
        """Offer a fresh segment to the shard (op ``shm``, before the ``op`` request that needs it,
        which an unreachable server's error names); unlinked once answered, either way. When a
        bigger segment cannot be made, the current one stays and bigger payloads go as frames."""
        try:
            segment = shm.ClientSegment.create(request_bytes, reply_bytes)
        except OSError as exc:
            why = f"cannot create a segment of {request_bytes + reply_bytes} bytes in {shm.segment_folder()}: " \
                  f"{exc.strerror or exc}"
            if conn.segment is None:
                self._refuse(conn.endpoint, why)
                return None
            log.info("%s; keeping the current one, bigger arrays go as ZeroMQ frames", why)
            return conn.keep_segment()
        try:
            self.call([(conn.shard, dict({"op": "shm"}, **segment.offer.fields()), [])], label=op)
        except ServerError as exc:
            segment.close()
            conn.drop_segment()
            self._refuse(conn.endpoint, str(exc))
            return None
        except BaseException:
            segment.close()
            raise
        segment.unlink()  # both sides have it mapped: nothing to leak in the folder any more
        conn.use_segment(segment)  # the server replaced the old one with it
        return segment

    def _refuse(self, endpoint: str, why: str) -> None:
        if endpoint not in self.no_shm:
            self.no_shm.add(endpoint)
            log.info("shared memory with %s is not possible (%s); arrays go as ZeroMQ frames", endpoint, why)

    # -- what a silent server is told ------------------------------------------------------
    def warn_waiting(self, conn: Connection, warn_at: float) -> float:
        """Say which server a request is waiting for, at warn_after_s and every 10 s after."""
        log.warning("waiting for the parameter server at %s (%d s)", conn.endpoint, round(warn_at))
        return warn_at + 10.0

    def unreachable(self, conn: Connection, op: str, timeout_s: float, connected: bool) -> str:
        if not connected:
            return f"no parameter server at {conn.endpoint} — start one with `hfs serve-params`"
        return (f"parameter server at {conn.endpoint} did not answer '{op}' within {timeout_s:g} s; "
                f"if it stopped, {self.recovery()}")

    # -- the end -------------------------------------------------------------------------------
    def detach(self) -> None:
        """Tell every shard whose segment this thread holds to unmap it now, not when it expires
        (a server that does not answer within DETACH_TIMEOUT_S is left to expire it)."""
        asks = [(conn.shard, {"op": "detach"}, []) for conn in self._opened() if conn.segment is not None]
        if not asks:
            return
        try:
            self.call(asks, DETACH_TIMEOUT_S, retry=False)
        except HfsError as exc:
            log.debug("detaching shared memory on close: %s", exc)

    def close(self) -> None:
        """Close every thread's sockets and segments, and the context."""
        self.closed = True
        with self._lock:
            unconfirmed = sum(conn.pending is not None for conn in self._all)
            if unconfirmed:  # another thread's (this one's were collected, or reported, by flush)
                log.warning("%d push(es) sent by other threads were not confirmed before close (call flush() "
                            "on the thread that pushed)", unconfirmed)
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._ctx.term()


class _Round:
    """The replies one round waits for: ``waiting`` maps each connection to the id of its request
    (None: only its pending push's reply), in request order."""

    def __init__(self, transport: Transport, timeout_s: float, label: str, copy_out: bool) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.label = label
        self.copy_out = copy_out
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + timeout_s
        self.waiting: dict[Connection, int | None] = {}
        self.replies: dict[Connection, proto.Message] = {}
        self.lost_pushes: list[tuple[Connection, PendingPush]] = []

    def settled(self, conn: Connection) -> bool:
        """This connection's reply is in (or none is awaited) and it has no pending push left."""
        return (self.waiting[conn] is None or conn in self.replies) and conn.pending is None

    def abandon(self) -> None:
        """A request left unanswered must never be answered into a later call, nor read its arrays
        from a shared-memory region a later request reuses: fresh sockets, no segments."""
        for conn in self.waiting:
            if not self.settled(conn) and not self.transport.closed:
                self.transport._replace(conn)

    def receive(self) -> None:
        """Collect every reply, each connection's pending push's reply first, as ZeroMQ delivers them."""
        zmq = self.transport._zmq
        poller = zmq.Poller()
        for conn in self.waiting:
            poller.register(conn.sock, zmq.POLLIN)
        warn_at = self.transport.warn_after_s
        while True:
            open_conns = [conn for conn in self.waiting if not self.settled(conn)]
            if not open_conns:
                return
            ready, warn_at = self._poll(poller, open_conns, warn_at)
            for conn in open_conns:
                if conn.sock in ready:
                    frames = conn.sock.recv_multipart(copy=False)
                    self.transport.bytes["received"] += sum(len(f) for f in frames)
                    self._take(conn, conn.decode(frames, self.transport.secret))

    def _poll(self, poller, open_conns: list[Connection], warn_at: float) -> tuple[dict, float]:
        """The sockets with a reply, warning while the first open one is silent; an HfsError naming it
        (and how to bring it back) once the round's time is up."""
        while True:
            remaining = self.deadline - time.monotonic()
            waited = time.perf_counter() - self.started
            slice_s = min(remaining, max(warn_at - waited, 0.01))
            ready = dict(poller.poll(max(0, int(slice_s * 1e3)))) if remaining > 0 else {}
            if ready:
                return ready, warn_at
            missing = open_conns[0]
            if remaining <= slice_s:
                what = f"push for step {missing.pending.step}" if missing.pending is not None else self.label
                raise HfsError(self.transport.unreachable(missing, what, self.timeout_s,
                                                          connected=missing.endpoint in self.transport.answered))
            warn_at = self.transport.warn_waiting(missing, warn_at)

    def _take(self, conn: Connection, msg: proto.Message) -> None:
        """File one reply: the connection's pending push's (confirmed, or kept to send again), or its request's.
        Sockets are replaced after a timeout, so a reply here answers one of them; the id check guards
        anyway (an error reply to an undecodable request has none)."""
        reply_id = msg.header.get("id")
        if conn.pending is not None and reply_id in (conn.pending.request_id, None):
            self.transport.answered.add(conn.endpoint)
            push, conn.pending = conn.pending, None
            if conn.confirm(push, msg):
                self.lost_pushes.append((conn, push))
        elif self.waiting[conn] is not None and reply_id in (self.waiting[conn], None):
            conn.note_reply(msg, self.copy_out)
            self.replies[conn] = msg
            self.transport.answered.add(conn.endpoint)
