"""MXNet RecordIO in pure Python: read and write ``.rec``/``.idx`` files exactly as dmlc-core does.

Framing (dmlc-core ``recordio.h``): every part is ``magic (u32 0xced7230a) | lrecord (u32) |
data | zero padding to 4 bytes`` where ``lrecord = cflag << 29 | length``. The writer splits a
payload wherever the magic appears at a 4-byte-aligned offset: the magic itself is dropped and
the pieces are written as parts with cflag 1 (first), 2 (middle), 3 (last); cflag 0 is a
whole record. The reader re-assembles the parts and puts the magic back between them.

Payloads of image files carry an ``IRHeader`` (struct ``<IfQQ``: flag, float32 label, id,
id2); ``flag > 0`` means ``flag`` float32 labels follow the header and the header's own label
field is unused. The ``.idx`` file is text, ``key\\toffset`` per line.

On top of that, :func:`read_layout` understands the InsightFace layout (record 0 points at a
block of identity records holding ``[start, end)`` image ranges) and plain im2rec files (every
record is an image with its label in the header), and :class:`InsightFaceWriter` writes the
former. Labels are float32 in this format, so anything past 2^24 is refused: it would be
rounded silently.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from hfs.utils.atomic import atomic_write, atomic_write_text
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEAD = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEADER.size
MAX_RECORD_BYTES = (1 << 29) - 1
MAX_EXACT_FLOAT_INT = 1 << 24  # float32 represents every integer up to here, not beyond

CFLAG_FULL, CFLAG_START, CFLAG_MIDDLE, CFLAG_END = 0, 1, 2, 3


def _aligned(n: int) -> int:
    return (n + 3) & ~3


# --------------------------------------------------------------------------- IRHeader


@dataclass(frozen=True)
class IRHeader:
    """The image-record header; ``labels`` holds one float, or ``flag`` floats when flag > 0."""

    flag: int
    labels: tuple[float, ...]
    id: int = 0
    id2: int = 0

    @property
    def label(self) -> float:
        """The first label: the class for image records (what arcface_torch uses too)."""
        return self.labels[0] if self.labels else 0.0


def check_exact_label(value: float, what: str) -> int:
    """An integer label/range value that float32 stores exactly, or an :class:`HfsError`."""
    if not np.isfinite(value) or value != int(value):
        raise HfsError(f"{what} is {value!r}, not an integer")
    if abs(value) > MAX_EXACT_FLOAT_INT:
        raise HfsError(f"{what} is {int(value)}, past 2^24 = {MAX_EXACT_FLOAT_INT}: RecordIO stores it as "
                       f"float32, which cannot represent every integer that large")
    return int(value)


def pack(labels: float | Sequence[float], payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Header + payload as ``mxnet.recordio.pack``: a scalar label gives flag 0, a sequence flag=len."""
    if isinstance(labels, (int, float, np.integer, np.floating)):
        values = [float(labels)]
        flag, head_label, extra = 0, float(labels), b""
    else:
        values = [float(v) for v in labels]
        flag, head_label = len(values), 0.0
        extra = np.asarray(values, dtype="<f4").tobytes()
    for v in values:
        if v.is_integer() and abs(v) > MAX_EXACT_FLOAT_INT:
            check_exact_label(v, f"label of record id {id}")
    return _IR_HEADER.pack(flag, head_label, id, id2) + extra + bytes(payload)


def unpack(record: bytes | memoryview, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record into its :class:`IRHeader` and the payload after the header and labels."""
    if len(record) < IR_HEADER_SIZE:
        raise HfsError(f"{where}: {len(record)} bytes, shorter than the {IR_HEADER_SIZE}-byte image header")
    flag, label, rid, rid2 = _IR_HEADER.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(0, (label,), rid, rid2), bytes(record[IR_HEADER_SIZE:])
    end = IR_HEADER_SIZE + 4 * flag
    if len(record) < end:
        raise HfsError(f"{where}: header says {flag} float labels follow but the record has only "
                       f"{len(record) - IR_HEADER_SIZE} bytes after the header")
    values = tuple(float(v) for v in np.frombuffer(record, dtype="<f4", count=flag, offset=IR_HEADER_SIZE))
    return IRHeader(flag, values, rid, rid2), bytes(record[end:])


# --------------------------------------------------------------------------- framing


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split at aligned magics exactly as dmlc-core writes them."""
    payload = bytes(payload)
    size = len(payload)
    if size > MAX_RECORD_BYTES:
        raise HfsError(f"record of {size} bytes is too large: RecordIO allows at most 2^29 - 1")
    parts: list[bytes] = []
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1 and pos + 4 <= size:
        if pos % 4 == 0:
            cflag = CFLAG_START if start == 0 else CFLAG_MIDDLE
            parts.append(_PART_HEAD.pack(MAGIC, (cflag << 29) | (pos - start)))
            parts.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    cflag = CFLAG_END if start != 0 else CFLAG_FULL
    parts.append(_PART_HEAD.pack(MAGIC, (cflag << 29) | (size - start)))
    parts.append(payload[start:])
    parts.append(b"\0" * (_aligned(size) - size))
    return b"".join(parts)


def decode_record(buf, offset: int, path: str | Path) -> tuple[bytes, int]:
    """Read the record starting at ``offset`` of ``buf``; returns (payload, offset of the next record)."""
    total = len(buf)
    chunks: list[bytes] = []
    first = True
    pos = offset
    while True:
        if pos + 8 > total:
            raise HfsError(f"{path}: truncated record at byte offset {pos} (needs an 8-byte part header, "
                           f"{total - pos} bytes left)")
        magic, lrec = _PART_HEAD.unpack_from(buf, pos)
        if magic != MAGIC:
            raise HfsError(f"{path}: bad magic 0x{magic:08x} at byte offset {pos} (expected 0x{MAGIC:08x}); "
                           f"the file is corrupt or the offset is wrong")
        cflag, length = lrec >> 29, lrec & MAX_RECORD_BYTES
        expected = (CFLAG_FULL, CFLAG_START) if first else (CFLAG_MIDDLE, CFLAG_END)
        if cflag not in expected:
            raise HfsError(f"{path}: continuation flag {cflag} at byte offset {pos} does not fit "
                           f"{'the start of a record' if first else 'a split record'}")
        end = pos + 8 + _aligned(length)
        if end > total:
            raise HfsError(f"{path}: truncated record at byte offset {pos}: part of {length} bytes runs "
                           f"past the end of the file ({total} bytes)")
        chunks.append(buf[pos + 8:pos + 8 + length])
        pos = end
        if cflag in (CFLAG_FULL, CFLAG_END):
            break
        chunks.append(MAGIC_BYTES)
        first = False
    return (bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)), pos


# --------------------------------------------------------------------------- index


def read_index(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets of a ``.idx`` file, in file order (int64 arrays)."""
    idx_path = Path(idx_path)
    try:
        text = idx_path.read_bytes()
    except OSError as exc:
        raise HfsError(f"cannot read index {idx_path}: {exc.strerror or exc}") from None
    fields = text.split()
    lines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    try:
        if len(fields) != 2 * lines or text.count(b"\t") != lines:
            raise ValueError
        arr = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        raise HfsError(_first_bad_index_line(idx_path, text)) from None
    return arr[:, 0].copy(), arr[:, 1].copy()


def _first_bad_index_line(idx_path: Path, text: bytes) -> str:
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split(b"\t")
        if len(parts) != 2 or not all(p.strip().lstrip(b"-").isdigit() for p in parts):
            return f"{idx_path} line {lineno}: expected 'key<TAB>offset', got {line[:60]!r}"
    return f"{idx_path}: not a RecordIO index (expected 'key<TAB>offset' lines)"


def index_text(keys: Sequence[int], offsets: Sequence[int]) -> str:
    return "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets))


# --------------------------------------------------------------------------- reading


class RecordFile:
    """A ``.rec`` opened for reading: random access by key through the ``.idx``, or a scan.

    The mmap is opened lazily and re-opened in each process that uses the object, and it is
    dropped when pickled, so one instance can be handed to DataLoader workers safely.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise HfsError(f"RecordIO file not found: {self.rec_path}")
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._mm: mmap.mmap | None = None
        self._fh: BinaryIO | None = None
        self._pid = -1
        if self.idx_path is not None:
            self.keys, self.offsets = read_index(self.idx_path)
            self._check_offsets()
        else:
            self.offsets = np.array([off for off, _ in self.scan()], dtype=np.int64)
            self.keys = np.arange(len(self.offsets), dtype=np.int64)
        self._dense_start = self._dense_key_start()
        self._sorted: np.ndarray | None = None

    # -- lifetime: one mmap per process, never shared across fork
    def _buffer(self):
        if self._mm is None or self._pid != os.getpid():
            self._fh = open(self.rec_path, "rb")
            size = os.fstat(self._fh.fileno()).st_size
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""  # type: ignore[assignment]
            self._pid = os.getpid()
        return self._mm

    def close(self) -> None:
        if self._mm is not None and self._pid == os.getpid():
            if isinstance(self._mm, mmap.mmap):
                self._mm.close()
            if self._fh is not None:
                self._fh.close()
        self._mm = self._fh = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_mm=None, _fh=None, _pid=-1)
        return state

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.keys)

    # -- key lookup
    def _check_offsets(self) -> None:
        size = self.rec_path.stat().st_size
        bad = np.flatnonzero((self.offsets < 0) | (self.offsets > size - 8) | (self.offsets % 4 != 0))
        if len(bad):
            i = int(bad[0])
            raise HfsError(f"{self.idx_path} line {i + 1}: offset {int(self.offsets[i])} of key "
                           f"{int(self.keys[i])} is not a record start inside {self.rec_path} ({size} bytes)")

    def _dense_key_start(self) -> int | None:
        if len(self.keys) and np.array_equal(self.keys, np.arange(self.keys[0], self.keys[0] + len(self.keys))):
            return int(self.keys[0])
        return None

    def offset_of(self, key: int) -> int:
        if self._dense_start is not None:
            pos = int(key) - self._dense_start
            if 0 <= pos < len(self.keys):
                return int(self.offsets[pos])
        else:
            if self._sorted is None:
                self._sorted = np.argsort(self.keys, kind="stable")
            i = int(np.searchsorted(self.keys, key, sorter=self._sorted))
            if i < len(self.keys) and self.keys[self._sorted[i]] == key:
                return int(self.offsets[self._sorted[i]])
        where = self.idx_path or self.rec_path
        raise HfsError(f"{where}: no record with key {key}")

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`offset_of` for many keys (all must exist)."""
        keys = np.asarray(keys, dtype=np.int64)
        found = self.has_keys(keys)
        if not found.all():
            self.offset_of(int(keys[~found][0]))  # raises, naming the key
        if self._dense_start is not None:
            return self.offsets[keys - self._dense_start]
        if self._sorted is None:
            self._sorted = np.argsort(self.keys, kind="stable")
        return self.offsets[self._sorted[np.searchsorted(self.keys, keys, sorter=self._sorted)]]

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised membership test of many keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense_start is not None:
            return (keys >= self._dense_start) & (keys < self._dense_start + len(self.keys))
        return np.isin(keys, self.keys)

    def __contains__(self, key: int) -> bool:
        try:
            self.offset_of(key)
        except HfsError:
            return False
        return True

    # -- reading
    def read_at(self, offset: int) -> bytes:
        return decode_record(self._buffer(), offset, self.rec_path)[0]

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (continuation parts re-assembled)."""
        return self.read_at(self.offset_of(key))

    def read_header(self, key: int) -> IRHeader:
        offset = self.offset_of(key)
        return unpack(self.read_at(offset), f"{self.rec_path} record {key} at byte offset {offset}")[0]

    def read_image(self, key: int) -> tuple[IRHeader, bytes]:
        offset = self.offset_of(key)
        return unpack(self.read_at(offset), f"{self.rec_path} record {key} at byte offset {offset}")

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order as (byte offset, payload), without using the index."""
        buf = self._buffer()
        pos, total = 0, len(buf)
        while pos < total:
            payload, nxt = decode_record(buf, pos, self.rec_path)
            yield pos, payload
            pos = nxt


# --------------------------------------------------------------------------- writing


class RecordWriter:
    """Append records to a ``.rec`` (and its ``.idx``); both appear only when :meth:`close` succeeds.

    Use as a context manager: on an exception the temp files are removed and nothing is left
    at the target paths.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(atomic_write(self.rec_path, "wb"))
        self._keys: list[int] = []
        self._offsets: list[int] = []

    def tell(self) -> int:
        return self._fh.tell()

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Write one record; with an index, ``key`` (default: the record ordinal) maps to its offset."""
        offset = self._fh.tell()
        self._fh.write(frame_record(payload))
        self._keys.append(len(self._keys) if key is None else int(key))
        self._offsets.append(offset)
        return offset

    def overwrite(self, offset: int, payload: bytes, framed_size: int) -> None:
        """Replace a record written earlier by one of exactly the same framed size."""
        framed = frame_record(payload)
        if len(framed) != framed_size:
            raise HfsError(f"{self.rec_path}: cannot overwrite the {framed_size}-byte record at {offset} "
                           f"with {len(framed)} bytes")
        end = self._fh.tell()
        self._fh.seek(offset)
        self._fh.write(framed)
        self._fh.seek(end)

    def close(self) -> None:
        """Publish the .rec, then the .idx (an index never points into a missing file)."""
        self._stack.close()
        if self.idx_path is not None:
            atomic_write_text(self.idx_path, index_text(self._keys, self._offsets))

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)


# --------------------------------------------------------------------------- InsightFace layout


@dataclass
class RecLayout:
    """Which records are images and their class labels.

    ``identity_ranges`` is the InsightFace identity block ((num_classes, 2) ``[start, end)`` image
    keys) or None for a plain im2rec file, whose labels come from each record's header.
    """

    image_keys: np.ndarray
    labels: np.ndarray
    num_classes: int
    identity_ranges: np.ndarray | None = None

    @property
    def is_insightface(self) -> bool:
        return self.identity_ranges is not None


def _insightface_header(rec: RecordFile) -> tuple[int, int] | None:
    """(first identity record, end) when record 0 is an InsightFace header, else None."""
    if 0 not in rec:
        return None
    header, payload = rec.read_image(0)
    if header.flag < 2 or payload:
        return None
    first, end = header.labels[0], header.labels[1]
    if first != int(first) or end != int(end) or not 1 <= first <= end:
        return None
    where = f"{rec.rec_path} record 0 (InsightFace header)"
    return check_exact_label(first, f"{where}: first identity record"), check_exact_label(end, f"{where}: end")


def read_layout(rec: RecordFile) -> RecLayout:
    """InsightFace layout when record 0 says so, else every record is an image (plain im2rec)."""
    head = _insightface_header(rec)
    if head is None:
        return _plain_layout(rec)
    first, end = head
    ranges = np.zeros((end - first, 2), dtype=np.int64)
    for i, key in enumerate(range(first, end)):
        header = rec.read_header(key)
        where = f"{rec.rec_path} identity record {key} at byte offset {rec.offset_of(key)}"
        if header.flag < 2:
            raise HfsError(f"{where}: expected an [start, end) image range, got flag {header.flag}")
        a = check_exact_label(header.labels[0], f"{where}: range start")
        b = check_exact_label(header.labels[1], f"{where}: range end")
        if not 1 <= a <= b <= first:
            raise HfsError(f"{where}: image range [{a}, {b}) lies outside the image records [1, {first})")
        ranges[i] = (a, b)
    counts = ranges[:, 1] - ranges[:, 0]
    image_keys = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]) if len(ranges) else \
        np.zeros(0, np.int64)
    labels = np.repeat(np.arange(len(ranges), dtype=np.int64), counts)
    if len(np.unique(image_keys)) != len(image_keys):
        raise HfsError(f"{rec.rec_path}: identity ranges overlap (an image record belongs to two identities)")
    if len(image_keys) != first - 1:
        log.warning("%s: %d of the image records 1..%d belong to no identity range and are ignored",
                    rec.rec_path, first - 1 - len(image_keys), first - 1)
    missing = image_keys[~rec.has_keys(image_keys)]
    if len(missing):
        raise HfsError(f"{rec.idx_path or rec.rec_path}: image record {int(missing[0])} named by an identity "
                       f"range is not in the index")
    return RecLayout(image_keys, labels, len(ranges), ranges)


def _plain_layout(rec: RecordFile) -> RecLayout:
    keys = np.sort(rec.keys)
    labels = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        header = rec.read_header(int(key))
        labels[i] = check_exact_label(header.label, f"{rec.rec_path} record {int(key)} at byte offset "
                                                    f"{rec.offset_of(int(key))}: label")
    if len(labels) and labels.min() < 0:
        bad = int(np.argmin(labels))
        raise HfsError(f"{rec.rec_path} record {int(keys[bad])}: negative label {int(labels[bad])}")
    return RecLayout(keys, labels, int(labels.max()) + 1 if len(labels) else 0, None)


def read_property(path: str | Path) -> tuple[int, int, int]:
    """The InsightFace ``property`` file: ``num_classes,h,w``."""
    path = Path(path)
    try:
        text = path.read_text().strip()
        num_classes, h, w = (int(v) for v in text.split(","))
    except OSError as exc:
        raise HfsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise HfsError(f"{path}: expected 'num_classes,height,width', got {path.read_text()[:60]!r}") from None
    return num_classes, h, w


def write_property(path: str | Path, num_classes: int, height: int, width: int) -> None:
    atomic_write_text(path, f"{num_classes},{height},{width}")


class InsightFaceWriter:
    """Write an InsightFace-layout ``.rec``/``.idx``: image records 1..n, identity records, record 0.

    Images must arrive grouped by label (each identity contiguous). Record 0 is reserved first
    (its framed size is fixed) and filled in at :meth:`close`, so the file is in key order and a
    scan without the index sees keys 0, 1, 2, ... Labels missing between 0 and the largest get an
    empty identity range, so identity ordinal and label always agree.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self._writer = RecordWriter(rec_path, idx_path)
        self._header_offset = self._writer.write(self._header_record(1, 1), key=0)
        self._header_size = self._writer.tell() - self._header_offset
        self._next_key = 1
        self._ranges: dict[int, tuple[int, int]] = {}
        self._current: int | None = None

    @staticmethod
    def _header_record(first: int, end: int) -> bytes:
        check_exact_label(first, "first identity record")
        check_exact_label(end, "end of identity records")
        return pack([float(first), float(end)], b"", id=0)

    def add(self, label: int, payload: bytes) -> int:
        """Append one encoded image of class ``label``; returns its record key."""
        label = int(label)
        check_exact_label(label, f"label of image {self._next_key}")
        if label < 0:
            raise HfsError(f"label of image {self._next_key} is negative ({label})")
        if label != self._current:
            if label in self._ranges:
                raise HfsError(f"images of label {label} are not contiguous: InsightFace layout needs "
                               f"each identity's images together")
            self._ranges[label] = (self._next_key, self._next_key)
            self._current = label
        key = self._next_key
        check_exact_label(key + 1, f"image record {key}")
        self._writer.write(pack(float(label), payload, id=key), key=key)
        self._ranges[label] = (self._ranges[label][0], key + 1)
        self._next_key += 1
        return key

    @property
    def num_classes(self) -> int:
        return max(self._ranges) + 1 if self._ranges else 0

    def close(self) -> None:
        first = key = self._next_key
        cursor = 1
        for label in range(self.num_classes):
            a, b = self._ranges.get(label, (cursor, cursor))
            cursor = b
            self._writer.write(pack([float(a), float(b)], b"", id=key), key=key)
            key += 1
        self._writer.overwrite(self._header_offset, self._header_record(first, key), self._header_size)
        self._writer.close()

    def __enter__(self) -> "InsightFaceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.__exit__(exc_type, exc, tb)
