"""hfs <-> mxnet RecordIO interoperability; runs only where mxnet imports (`make interop`)."""

import numpy as np
import pytest

pytestmark = pytest.mark.interop
mx = pytest.importorskip("mxnet")

from hfs.data.recordio import (MAGIC_BYTES, InsightFaceWriter, RecordFile, RecordWriter, pack,  # noqa: E402
                               read_layout, unpack)

# payloads that exercise padding and the continuation split (magic at aligned offsets)
PAYLOADS = [b"", b"a", b"abcd", b"xyz" * 7, MAGIC_BYTES, b"head" + MAGIC_BYTES + b"tail!" + MAGIC_BYTES,
            MAGIC_BYTES * 3 + b"ab", bytes(range(256)) * 3]


def test_mxnet_writes_hfs_reads(tmp_path):
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "m.idx"), str(tmp_path / "m.rec"), "w")
    for i, payload in enumerate(PAYLOADS):
        label = float(i) if i % 2 else [float(i), 0.5, -2.0]
        writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, label, i, 0), payload))
    writer.close()
    rec = RecordFile(tmp_path / "m.rec", tmp_path / "m.idx")
    for i, payload in enumerate(PAYLOADS):
        header, body = unpack(rec.read(i))
        assert body == payload and header.id == i
        assert header.labels == ((float(i),) if i % 2 else (float(i), 0.5, -2.0))
    assert [p for _, p in rec.scan()] == [rec.read(i) for i in range(len(PAYLOADS))]


def test_hfs_writes_mxnet_reads(tmp_path):
    with RecordWriter(tmp_path / "h.rec", tmp_path / "h.idx") as writer:
        for i, payload in enumerate(PAYLOADS):
            writer.write(pack(float(i) if i % 2 else [float(i), 0.5], payload, id=i), key=i)
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "h.idx"), str(tmp_path / "h.rec"), "r")
    assert sorted(reader.keys) == list(range(len(PAYLOADS)))
    for i, payload in enumerate(PAYLOADS):
        header, body = mx.recordio.unpack(reader.read_idx(i))
        assert body == payload and header.id == i
        expected = float(i) if i % 2 else np.array([i, 0.5], np.float32)
        assert np.array_equal(np.asarray(header.label), expected)
    reader.close()
    sequential = mx.recordio.MXRecordIO(str(tmp_path / "h.rec"), "r")
    for payload in PAYLOADS:
        assert mx.recordio.unpack(sequential.read())[1] == payload
    assert sequential.read() is None


def test_insightface_layout_readable_by_mxnet_like_arcface_torch(tmp_path):
    with InsightFaceWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for label, payload in [(0, b"img0"), (0, b"img1" + MAGIC_BYTES), (1, b"img2")]:
            writer.add(label, payload)
    reader = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "r")
    header, _ = mx.recordio.unpack(reader.read_idx(0))
    assert header.flag > 0
    first, end = int(header.label[0]), int(header.label[1])
    assert list(range(1, first)) == [1, 2, 3]
    ranges = [tuple(int(v) for v in mx.recordio.unpack(reader.read_idx(i))[0].label) for i in range(first, end)]
    assert ranges == [(1, 3), (3, 4)]
    header, body = mx.recordio.unpack(reader.read_idx(2))
    assert header.label == 0.0 and body == b"img1" + MAGIC_BYTES
    layout = read_layout(RecordFile(tmp_path / "train.rec", tmp_path / "train.idx"))
    assert layout.labels.tolist() == [0, 0, 1]


def test_insightface_rec_written_by_mxnet_reads(tmp_path):
    """The layout as InsightFace's own packing scripts write it: record 0 last in the file."""
    images = [(label, b"jpeg-%d-%d" % (label, v) + MAGIC_BYTES * v) for label in range(3) for v in range(2)]
    writer = mx.recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key, (label, data) in enumerate(images, 1):
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), key, 0), data))
    first = len(images) + 1
    for label in range(3):
        rng = (1 + 2 * label, 3 + 2 * label)
        writer.write_idx(first + label, mx.recordio.pack(mx.recordio.IRHeader(0, rng, first + label, 0), b""))
    writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, (first, first + 3), 0, 0), b""))
    writer.close()
    rec = RecordFile(tmp_path / "train.rec", tmp_path / "train.idx")
    layout = read_layout(rec)
    assert layout.is_insightface and layout.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [rec.read_image(int(k))[1] for k in layout.image_keys] == [data for _, data in images]
