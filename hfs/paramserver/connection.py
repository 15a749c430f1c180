"""One calling thread's link to one shard: its DEALER socket, its shared-memory segment and its pending push.

A client thread has one :class:`Connection` per shard (a background index rebuild never
shares a socket with the training loop). What a connection holds, it holds alone: the
socket (one request in flight, plus at most one pipelined push), the segment its arrays go
through (request region first, then reply region, each grown when a request or reply did not
fit), and that push, remembered until the reply that confirms it. The rounds of requests
that use connections (send each, collect every reply, attach a segment, send a lost push
again) are :mod:`hfs.paramserver.transport`'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hfs.paramserver import protocol as proto
from hfs.paramserver import shm
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

#: ops whose arrays (and replies' arrays) go through a connection's shared-memory segment
SHM_OPS = ("get", "set", "push", "select")


class ServerError(HfsError):
    """The server answered with an error (bad request, failed step, ...)."""


@dataclass
class PendingPush:
    """A push sent without waiting for its reply (one at most per connection)."""

    request_id: int
    step: int
    header: dict
    carried: list  # the arrays as sent when they lie in the request region (``proto.InSegment``; else [])
    region_end: int  # end of its arrays in the segment's request region (0: none there)


def grown(current: int, need: int, cap: int) -> int:
    """A region size for ``need`` bytes (<= ``cap``): the current one if it fits, else at least double it."""
    if need <= current:
        return current
    return min(max(need, 2 * current, shm.DEFAULT_REGION_BYTES), cap)


class Connection:
    """Shard ``shard``'s socket at ``endpoint`` for one thread, with its segment and pending push."""

    def __init__(self, shard: int, endpoint: str, sock: Any) -> None:
        self.shard = shard
        self.endpoint = endpoint
        self.sock = sock
        self.segment: shm.ClientSegment | None = None
        self.reply_bytes = shm.DEFAULT_REGION_BYTES  # the reply region a reply that came as frames asked for
        self.region_cap = shm.MAX_REGION_BYTES  # lowered when a bigger segment could not be made
        self.pending: PendingPush | None = None

    # -- the segment -------------------------------------------------------------------
    def sizes_for(self, need: int) -> tuple[int, int] | None:
        """(request, reply) region sizes of a segment for a request of ``need`` bytes; None: the
        current segment fits. A request over the cap goes as frames, so it asks for nothing."""
        cap = self.region_cap
        need = need if need <= cap else 0
        need_reply = min(self.reply_bytes, cap)
        current = self.segment
        if current is not None and need <= current.request_bytes and need_reply <= current.reply_bytes:
            return None
        return (grown(current.request_bytes if current is not None else 0, need, cap),
                grown(current.reply_bytes if current is not None else 0, need_reply, cap))

    def keep_segment(self) -> shm.ClientSegment | None:
        """A bigger segment could not be made: keep the current one, bigger payloads go as frames."""
        if self.segment is not None:
            self.region_cap = min(self.segment.request_bytes, self.segment.reply_bytes)
        return self.segment

    def use_segment(self, segment: shm.ClientSegment) -> None:
        """The server mapped ``segment`` in place of the old one."""
        self.drop_segment()
        self.segment = segment

    def drop_segment(self) -> None:
        segment, self.segment = self.segment, None
        if segment is not None:
            segment.close()

    def lost_segment(self, msg: proto.Message) -> bool:
        """The server no longer has this connection's segment (it dropped an idle one): forget it here too."""
        if msg.header.get("ok") or not str(msg.header.get("error", "")).startswith(proto.NO_SEGMENT_ERROR):
            return False
        log.debug("parameter server %s dropped this socket's segment; attaching again", self.endpoint)
        self.drop_segment()
        return True

    # -- requests ----------------------------------------------------------------------
    def can_follow(self, op: str, arrays: Sequence[np.ndarray], shared_memory: bool) -> bool:
        """Whether a request may be sent while this connection's push is pending: always when the
        push went as frames (ZeroMQ keeps the order); when it lies in the segment, only if this
        request's arrays fit after it in the same segment (then both meet a dropped segment
        alike, and are sent again in order)."""
        if self.pending is None or not self.pending.region_end:
            return True
        segment = self.segment
        if not shared_memory or op not in SHM_OPS or not arrays or segment is None:
            return False
        if min(self.reply_bytes, self.region_cap) > segment.reply_bytes:
            return False  # the segment is about to be replaced by a bigger one
        need = sum(shm.request_nbytes([np.asarray(a)]) for a in arrays)
        return self.pending.region_end + need <= segment.reply_offset

    def after_pending(self) -> int:
        """Where a request's arrays start in the request region: after a pending push's (which the
        server has not read yet), else at its start."""
        end = self.pending.region_end if self.pending is not None else 0
        return max(end, shm.DATA_OFFSET)

    def remember_push(self, request_id: int, header: dict, carried: Sequence[Any]) -> None:
        """A push sent without waiting: kept until its reply, with its arrays when they lie in the
        segment (a push the server could not read is sent again from them)."""
        ends = [shm.aligned(a.offset + math.prod(a.shape) * a.dtype.itemsize)
                for a in carried if isinstance(a, proto.InSegment)]
        self.pending = PendingPush(request_id, int(header.get("step", -1)), dict(header),
                                   list(carried) if ends else [], max(ends, default=0))

    def confirm(self, push: PendingPush, msg: proto.Message) -> bool:
        """A pending push's reply: fine (False); lost with its segment (True: its arrays copied out
        of the segment, to be sent again); or failed: ServerError naming the push's step."""
        if msg.header.get("ok"):
            return False
        error = str(msg.header.get("error", ""))
        segment = self.segment
        if error.startswith(proto.NO_SEGMENT_ERROR) and segment is not None and push.region_end:
            push.carried = [segment.array(a.dtype, a.shape, a.offset).copy() if isinstance(a, proto.InSegment)
                            else a for a in push.carried]
            log.debug("parameter server %s dropped this socket's segment; sending the push again", self.endpoint)
            self.drop_segment()
            return True
        raise ServerError(f"push for step {push.step} failed: parameter server {self.endpoint}: {error}")

    # -- replies -----------------------------------------------------------------------
    def decode(self, frames: list, secret: bytes | None) -> proto.Message:
        """A reply's message (arrays in the segment are views of it), or an error naming this server."""
        try:
            return proto.decode(frames, secret, segment=self.segment)
        except proto.ProtocolError as exc:
            text = str(exc)
            if secret:  # the server refused our signature: its (unsigned) error says why
                try:
                    unsigned = proto.decode(frames, None)
                except proto.ProtocolError:
                    unsigned = None
                if unsigned is not None and unsigned.header.get("ok") is False:
                    raise ServerError(f"parameter server {self.endpoint}: {unsigned.header.get('error')}")
            if not secret and "array frame" in text:
                text += "; the server may require a shared secret (paramserver.secret or HFS_PS_SECRET)"
            raise HfsError(f"bad reply from parameter server {self.endpoint}: {text}") from None

    def note_reply(self, msg: proto.Message, copy_out: bool) -> None:
        """Copy arrays out of the segment (the caller owns its arrays; the next reply reuses the
        region), and grow the reply region when a reply had to come as frames."""
        if copy_out:
            msg.arrays = [a.copy() if shared else a for a, shared in zip(msg.arrays, msg.in_segment)]
        if self.segment is not None and not all(msg.in_segment):
            total = shm.request_nbytes(msg.arrays)
            if self.segment.reply_bytes < total <= self.region_cap:
                self.reply_bytes = total

    def close(self) -> None:
        """Close the socket (nothing queued is delivered later) and unmap the segment."""
        self.sock.close(0)
        self.drop_segment()
