import struct

import numpy as np
import pytest

from hfs.data.recordio import (MAGIC, MAGIC_BYTES, InsightFaceWriter, RecordFile, RecordWriter, frame_record,
                               pack, read_index, read_layout, read_property, unpack, write_property)
from hfs.utils.errors import HfsError


def _parts(framed: bytes):
    """(cflag, length) of each part of one framed record, walking the raw bytes."""
    out, pos = [], 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        out.append((lrec >> 29, length))
        pos += 8 + ((length + 3) & ~3)
    assert pos == len(framed)
    return out


def _write(path, payloads, keys=None):
    with RecordWriter(path / "a.rec", path / "a.idx") as w:
        for i, p in enumerate(payloads):
            w.write(p, key=None if keys is None else keys[i])
    return RecordFile(path / "a.rec", path / "a.idx")


def test_plain_record_is_padded_to_four_bytes():
    framed = frame_record(b"abcde")
    assert len(framed) == 8 + 8 and framed[8:13] == b"abcde" and framed[13:] == b"\0\0\0"
    assert _parts(framed) == [(0, 5)]
    assert _parts(frame_record(b"")) == [(0, 0)]


def test_aligned_magic_splits_exactly_as_dmlc():
    payload = b"AAAA" + MAGIC_BYTES + b"BBBBBBBB" + MAGIC_BYTES + b"CC"
    framed = frame_record(payload)
    # start part (4 bytes), middle part (8 bytes), end part (2 bytes + 2 padding); magics dropped.
    assert _parts(framed) == [(1, 4), (2, 8), (3, 2)]
    # magic at the very start gives an empty first part; at the very end an empty last part
    assert _parts(frame_record(MAGIC_BYTES + b"xy")) == [(1, 0), (3, 2)]
    assert _parts(frame_record(b"wxyz" + MAGIC_BYTES)) == [(1, 4), (3, 0)]
    # an unaligned magic is not split
    assert _parts(frame_record(b"ab" + MAGIC_BYTES + b"cd")) == [(0, 8)]


@pytest.mark.parametrize("payload", [
    b"AAAA" + MAGIC_BYTES + b"BBBBBBBB" + MAGIC_BYTES + b"CC",
    MAGIC_BYTES, MAGIC_BYTES * 3, b"ab" + MAGIC_BYTES + b"cd", b"x" * 7, b"",
])
def test_split_records_reassemble(tmp_path, payload):
    rec = _write(tmp_path, [b"before", payload, b"after"])
    assert [rec.read(k) for k in range(3)] == [b"before", payload, b"after"]
    assert [p for _, p in rec.scan()] == [b"before", payload, b"after"]


def test_index_and_scan_agree(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(n)) for n in rng.integers(0, 50, 40)] + [MAGIC_BYTES * 2]
    keys = [1000 + 3 * i for i in range(len(payloads))]  # sparse keys exercise the sorted lookup
    rec = _write(tmp_path, payloads, keys)
    keys_idx, offsets = read_index(tmp_path / "a.idx")
    assert list(keys_idx) == keys
    scanned = list(rec.scan())
    assert [off for off, _ in scanned] == list(offsets)
    assert [p for _, p in scanned] == [rec.read(k) for k in keys] == payloads
    no_index = RecordFile(tmp_path / "a.rec")
    assert [no_index.read(i) for i in range(len(payloads))] == payloads
    with pytest.raises(HfsError, match="no record with key 5"):
        rec.read(5)


def test_irheader_scalar_and_multi_float_labels():
    header, body = unpack(pack(7, b"img", id=3, id2=4))
    assert (header.flag, header.label, header.id, header.id2, body) == (0, 7.0, 3, 4, b"img")
    header, body = unpack(pack([1.5, 2.0, -3.0], b"xyz", id=9))
    assert header.flag == 3 and header.labels == (1.5, 2.0, -3.0) and body == b"xyz"
    raw = struct.pack("<IfQQ", 0, 2.0, 1, 0)
    assert pack(2.0, b"", id=1) == raw  # byte layout of mxnet.recordio.pack
    with pytest.raises(HfsError, match="float labels follow"):
        unpack(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


def test_label_past_2_pow_24_is_refused():
    pack(float(1 << 24), b"")
    with pytest.raises(HfsError, match="2\\^24"):
        pack(float((1 << 24) + 2), b"")
    with pytest.raises(HfsError, match="2\\^24"):
        pack([0.0, float(1 << 25)], b"")


def test_bad_magic_names_file_and_offset(tmp_path):
    rec = _write(tmp_path, [b"aaaa", b"bbbb", b"cccc"])
    _, offsets = read_index(tmp_path / "a.idx")
    data = bytearray((tmp_path / "a.rec").read_bytes())
    data[int(offsets[1])] ^= 0xFF
    (tmp_path / "a.rec").write_bytes(bytes(data))
    rec = RecordFile(tmp_path / "a.rec", tmp_path / "a.idx")
    assert rec.read(0) == b"aaaa"
    with pytest.raises(HfsError, match=rf"a\.rec: bad magic .* at byte offset {int(offsets[1])}"):
        rec.read(1)
    with pytest.raises(HfsError, match=f"byte offset {int(offsets[1])}"):
        list(rec.scan())


def test_truncated_record_names_offset(tmp_path):
    _write(tmp_path, [b"a" * 16, b"b" * 40])
    _, offsets = read_index(tmp_path / "a.idx")
    data = (tmp_path / "a.rec").read_bytes()
    (tmp_path / "a.rec").write_bytes(data[:-10])
    with pytest.raises(HfsError, match=f"truncated record at byte offset {int(offsets[1])}"):
        RecordFile(tmp_path / "a.rec", tmp_path / "a.idx").read(1)
    (tmp_path / "a.rec").write_bytes(data[:int(offsets[1]) + 5])
    with pytest.raises(HfsError, match="truncated record"):
        RecordFile(tmp_path / "a.rec")  # scanning without an index finds it too


def test_bad_index_line_is_named(tmp_path):
    _write(tmp_path, [b"a", b"b"])
    (tmp_path / "a.idx").write_text("0\t0\nfoo bar\n")
    with pytest.raises(HfsError, match="a.idx line 2"):
        RecordFile(tmp_path / "a.rec", tmp_path / "a.idx")
    (tmp_path / "a.idx").write_text("0\t0\n1\t6\n")
    with pytest.raises(HfsError, match="a.idx line 2: offset 6"):
        RecordFile(tmp_path / "a.rec", tmp_path / "a.idx")


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
            w.write(b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_insightface_layout_round_trip(tmp_path):
    images = [(0, b"i0a"), (0, b"i0b"), (1, b"i1a"), (3, b"i3a" + MAGIC_BYTES), (3, b"i3b")]
    with InsightFaceWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        keys = [w.add(label, data) for label, data in images]
    assert keys == [1, 2, 3, 4, 5]
    rec = RecordFile(tmp_path / "train.rec", tmp_path / "train.idx")
    header, body = rec.read_image(0)
    assert header.labels == (6.0, 10.0) and body == b""  # identities 0..3 at records 6..9
    layout = read_layout(rec)
    assert layout.is_insightface and layout.num_classes == 4
    assert layout.identity_ranges.tolist() == [[1, 3], [3, 4], [4, 4], [4, 6]]  # label 2: empty range
    assert layout.image_keys.tolist() == [1, 2, 3, 4, 5] and layout.labels.tolist() == [0, 0, 1, 3, 3]
    for key, (label, data) in zip(layout.image_keys, images):
        header, body = rec.read_image(int(key))
        assert header.label == label and body == data
    # the file is in key order, so a scan without the index agrees
    assert [p for _, p in rec.scan()] == [rec.read(k) for k in range(10)]


def test_insightface_writer_refuses_scattered_identity(tmp_path):
    with pytest.raises(HfsError, match="not contiguous"):
        with InsightFaceWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
            w.add(0, b"a")
            w.add(1, b"b")
            w.add(0, b"c")
    assert list(tmp_path.iterdir()) == []


def test_plain_im2rec_labels_from_headers(tmp_path):
    payloads = [pack(float(label), b"img%d" % i, id=i) for i, label in enumerate([2, 0, 1, 2])]
    rec = _write(tmp_path, payloads)
    layout = read_layout(rec)
    assert not layout.is_insightface
    assert layout.labels.tolist() == [2, 0, 1, 2] and layout.num_classes == 3


def test_insightface_header_past_2_pow_24_refused(tmp_path):
    # written by another tool: hfs's own pack() would refuse this value
    raw = struct.pack("<IfQQ", 2, 0.0, 0, 0) + np.array([1.0, (1 << 24) + 4], "<f4").tobytes()
    rec = _write(tmp_path, [raw])
    with pytest.raises(HfsError, match="2\\^24"):
        read_layout(rec)


def test_property_file(tmp_path):
    write_property(tmp_path / "property", 12, 112, 96)
    assert read_property(tmp_path / "property") == (12, 112, 96)
    (tmp_path / "property").write_text("12;112")
    with pytest.raises(HfsError, match="num_classes,height,width"):
        read_property(tmp_path / "property")


def test_record_file_reopens_after_pickle(tmp_path):
    import pickle

    rec = _write(tmp_path, [b"one", b"two"])
    assert rec.read(1) == b"two"
    clone = pickle.loads(pickle.dumps(rec))
    assert clone.read(0) == b"one"


def test_overlapping_identity_ranges_are_refused(tmp_path):
    payloads = [pack([3.0, 5.0], b""), pack(0.0, b"a"), pack(0.0, b"b"),
                pack([1.0, 3.0], b""), pack([2.0, 3.0], b"")]
    with pytest.raises(HfsError, match="identity ranges overlap"):
        read_layout(_write(tmp_path, payloads))
