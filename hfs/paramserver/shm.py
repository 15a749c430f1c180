"""Same-host shared memory for the served data path: the bulk arrays skip ZeroMQ.

A client on the server's host creates a segment file (``/dev/shm``, else the system temp
folder; mode 0600, a random name, a random nonce in its first bytes), offers it with the
``shm`` op and unlinks it once the server has mapped it: the two mappings keep the memory,
and nothing is left in the folder when either side dies. A request then carries its arrays
in the segment's request region and only their offsets in the header; the server writes the
reply's arrays into the reply region. One request is in flight per socket, plus at most one
push sent without waiting for its reply (``paramserver.pipeline_pushes``): the request after
such a push places its arrays after the push's in the request region, or waits for the push's
reply first when they do not fit. Each socket (one per client thread and shard) has its own
segment; ``close()`` tells the server to unmap it (op ``detach``).

The server maps only a regular file (no symlink) of this user, private to it, directly in
that folder, with the hfs name pattern, the offered size and the offered nonce.
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import mmap
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hfs.paramserver import protocol as proto

log = logging.getLogger(__name__)

PREFIX = "hfs-ps-"
#: ``hfs-ps-<creator pid>-<32 hex digits>``: the pid lets a later client sweep a dead one's leftover
NAME_PATTERN = re.compile(r"hfs-ps-([0-9]{1,10})-([0-9a-f]{32})")
NONCE_BYTES = 16
#: arrays start here and at multiples of ALIGN (the nonce sits in the first bytes)
DATA_OFFSET = 64
ALIGN = 64
#: largest region (request or reply) a client makes; bigger payloads travel as frames
MAX_REGION_BYTES = 64 << 20
#: largest segment a server maps
MAX_SEGMENT_BYTES = 2 * MAX_REGION_BYTES + DATA_OFFSET
DEFAULT_REGION_BYTES = 4 << 20
#: a segment file older than this whose creator is gone was left by a crash during a handshake
STALE_AFTER_S = 60.0


def segment_folder() -> str:
    """Where segments live: /dev/shm (memory, never disk) where it exists, else the temp folder."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.realpath(folder)


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to ALIGN: where the next array in a region may start."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN



class SegmentView:
    """Arrays at offsets of a mapped segment, bounds-checked; shared by client and server."""

    def __init__(self, buf: mmap.mmap, size: int, reply_offset: int) -> None:
        self.buf = buf
        self.size = size
        self.reply_offset = reply_offset
        self._u8 = np.frombuffer(buf, dtype=np.uint8, count=size)
        self._base = self._u8.ctypes.data
        self.last_used = time.monotonic()

    def array(self, dtype: np.dtype, shape: tuple[int, ...], offset: Any) -> np.ndarray:
        """The (writable) array at ``offset``; a ProtocolError when it does not lie in the data area."""
        if type(offset) is not int or offset < DATA_OFFSET or offset % 8:
            raise proto.ProtocolError(f"shared-memory offset {offset!r} must be an integer >= {DATA_OFFSET}, "
                                      "a multiple of 8")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > self.size:
            raise proto.ProtocolError(f"shared-memory array {dtype.name}{list(shape)} at offset {offset} ends past "
                                      f"the segment's {self.size} bytes")
        return self._u8[offset:offset + nbytes].view(dtype).reshape(shape)

    def region(self, start: int, stop: int, n: int, dim: int) -> np.ndarray | None:
        """A float32 (n, dim) array at ``start`` if it fits before ``stop``, else None."""
        if start + n * dim * 4 > stop:
            return None
        return self._u8[start:start + n * dim * 4].view(np.float32).reshape(n, dim)

    def offset_of(self, arr: np.ndarray) -> int | None:
        """Where ``arr`` (C-contiguous) lies in this segment, or None if it does not."""
        addr = arr.__array_interface__["data"][0] - self._base
        if 0 <= addr and addr + arr.nbytes <= self.size and arr.flags.c_contiguous:
            return int(addr)
        return None

    def place(self, arrays: Sequence[np.ndarray], start: int, stop: int, *, all_or_none: bool
              ) -> list[Any] | None:
        """Copy arrays into [start, stop) (64-byte aligned, in order); each becomes a
        ``proto.InSegment``, except one too big (kept as a frame). An array already in the
        region stays where it is. ``all_or_none``: None unless every array fits."""
        out: list[Any] = []
        pos = start
        for arr in arrays:
            at = self.offset_of(arr)
            if at is not None and start <= at and at + arr.nbytes <= stop:
                out.append(proto.InSegment(arr.dtype, tuple(arr.shape), at))
                pos = max(pos, aligned(at + arr.nbytes))
                continue
            if pos + arr.nbytes > stop:
                if all_or_none:
                    return None
                out.append(arr)
                continue
            view = self._u8[pos:pos + arr.nbytes].view(arr.dtype).reshape(arr.shape)
            np.copyto(view, arr, casting="no")
            out.append(proto.InSegment(arr.dtype, tuple(arr.shape), pos))
            pos = aligned(pos + arr.nbytes)
        return out

    def close(self) -> None:
        """Unmap (later, by the garbage collector, if a view of it is still alive)."""
        self._u8 = None
        try:
            self.buf.close()
        except BufferError:
            pass


# --------------------------------------------------------------------------- client side


@dataclass
class Offer:
    path: str
    size: int
    reply_offset: int
    nonce: str

    def fields(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "reply_offset": self.reply_offset, "nonce": self.nonce}


class ClientSegment(SegmentView):
    """A segment this client created: request region first, then the reply region."""

    def __init__(self, buf: mmap.mmap, offer: Offer) -> None:
        super().__init__(buf, offer.size, offer.reply_offset)
        self.offer = offer
        self.linked = True

    @classmethod
    def create(cls, request_bytes: int, reply_bytes: int, folder: str | None = None) -> "ClientSegment":
        """A fresh 0600 segment file of the given region sizes, its nonce written (OSError if impossible)."""
        folder = folder or segment_folder()
        sweep_stale(folder)
        request_bytes, reply_bytes = aligned(request_bytes), aligned(reply_bytes)
        size = DATA_OFFSET + request_bytes + reply_bytes
        path = os.path.join(folder, f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
        try:
            _reserve(fd, size)
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        nonce = secrets.token_bytes(NONCE_BYTES)
        buf[:NONCE_BYTES] = nonce
        return cls(buf, Offer(path, size, DATA_OFFSET + request_bytes, nonce.hex()))

    @property
    def request_bytes(self) -> int:
        return self.reply_offset - DATA_OFFSET

    @property
    def reply_bytes(self) -> int:
        return self.size - self.reply_offset

    def place_request(self, arrays: Sequence[np.ndarray], start: int = DATA_OFFSET) -> list[Any] | None:
        """The request's arrays in the request region from ``start`` (after a pending push's
        arrays, which the server has not read yet), or None when they do not all fit."""
        return self.place(arrays, start, self.reply_offset, all_or_none=True)

    def unlink(self) -> None:
        """Remove the file; the mappings keep the memory."""
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.offer.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        super().close()


def _reserve(fd: int, size: int) -> None:
    """Size the file with its pages reserved: a full /dev/shm (Docker's default is 64 MB) then
    fails here with ENOSPC instead of killing a process with SIGBUS at its first write."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def request_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes the arrays need in a region (each 64-byte aligned)."""
    return sum(aligned(a.nbytes) for a in arrays)


def sweep_stale(folder: str) -> None:
    """Remove segment files of this user whose creating process is gone (a crash mid-handshake)."""
    now = time.time()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        match = NAME_PATTERN.fullmatch(name)
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (not match or st.st_uid != os.geteuid() or now - st.st_mtime < STALE_AFTER_S
                or _alive(int(match.group(1)))):
            continue
        try:
            os.unlink(path)
            log.info("removed a stale shared-memory segment %s", path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# --------------------------------------------------------------------------- server side


def _int_field(header: dict, key: str) -> int:
    value = proto.field_of(header, key, int)
    if value < 0:
        raise proto.ProtocolError(f"header field '{key}' must be >= 0, got {value}")
    return value


def open_offered(header: dict, folder: str | None = None) -> SegmentView:
    """Map the segment a ``shm`` request offers, after every check; a ProtocolError naming the failed one."""
    folder = folder or segment_folder()
    path = proto.field_of(header, "path", str)
    size, reply_offset = _int_field(header, "size"), _int_field(header, "reply_offset")
    nonce_hex = proto.field_of(header, "nonce", str)
    if not re.fullmatch(f"[0-9a-f]{{{2 * NONCE_BYTES}}}", nonce_hex):
        raise proto.ProtocolError(f"header field 'nonce' must be {2 * NONCE_BYTES} lower-case hex digits")
    if os.path.dirname(path) != folder or not NAME_PATTERN.fullmatch(os.path.basename(path)):
        raise proto.ProtocolError(f"shared-memory path {path!r} is not an hfs segment in {folder}")
    if not DATA_OFFSET < size <= MAX_SEGMENT_BYTES:
        raise proto.ProtocolError(f"header field 'size' must be in {DATA_OFFSET + 1}..{MAX_SEGMENT_BYTES}, got {size}")
    if not DATA_OFFSET <= reply_offset <= size or reply_offset % ALIGN:
        raise proto.ProtocolError(f"header field 'reply_offset' {reply_offset} must be a multiple of {ALIGN} "
                                  f"in {DATA_OFFSET}..{size}")
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise proto.ProtocolError(f"cannot open shared-memory segment {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise proto.ProtocolError(f"shared-memory segment {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise proto.ProtocolError(f"shared-memory segment {path} is not private to this user (mode 0600)")
        if st.st_size != size:
            raise proto.ProtocolError(f"shared-memory segment {path} has {st.st_size} bytes, the offer says {size}")
        buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if not hmac.compare_digest(bytes(buf[:NONCE_BYTES]), bytes.fromhex(nonce_hex)):
        buf.close()
        raise proto.ProtocolError(f"shared-memory segment {path}: nonce mismatch")
    return SegmentView(buf, size, reply_offset)
