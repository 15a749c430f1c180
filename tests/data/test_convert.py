import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfs.data import convert as convert_mod
from hfs.data.convert import images_to_rec, rec_to_images
from hfs.data.filelist import image_extension, read_image_list, split_per_identity
from hfs.data.recordio import RecordFile, RecordWriter, pack, read_index, read_layout, read_property
from hfs.data.synthetic import write_synthetic_rec
from hfs.utils.errors import HfsError


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory):
    """6 identities x 5 JPEG images of 24x24 in the InsightFace layout."""
    folder = tmp_path_factory.mktemp("rec")
    write_synthetic_rec(folder, num_classes=6, images_per_class=5, image_size=24, seed=1)
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rec_to_images_is_lossless(small_rec, tmp_path):
    summary = rec_to_images(small_rec, tmp_path / "out", val_ratio=0.2, seed=0, workers=1)
    assert summary.images == 30 and summary.identities == 6 and summary.val_images == 6
    rec = RecordFile(small_rec / "train.rec", small_rec / "train.idx")
    layout = read_layout(rec)
    train, train_labels = read_image_list(tmp_path / "out/train_list.txt")
    val, val_labels = read_image_list(tmp_path / "out/val_list.txt")
    assert len(train) == 24 and len(val) == 6 and sorted(set(val_labels.tolist())) == list(range(6))
    for rel, label in zip(train + val, np.concatenate([train_labels, val_labels])):
        key = int(Path(rel).stem)
        header, data = rec.read_image(key)
        assert (tmp_path / "out" / rel).read_bytes() == data and header.label == label
        assert rel == f"images/{label}/{key}.jpg"
    assert (tmp_path / "out/property").read_bytes() == (small_rec / "property").read_bytes()
    assert summary.bytes == sum(len(rec.read_image(int(k))[1]) for k in layout.image_keys)


def test_round_trip_is_byte_identical(small_rec, tmp_path):
    rec_to_images(small_rec, tmp_path / "a", val_ratio=0.2, seed=3, workers=2)
    images_to_rec(tmp_path / "a", tmp_path / "rec")
    rec_to_images(tmp_path / "rec", tmp_path / "b", val_ratio=0.2, seed=3, workers=1)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    original = read_layout(RecordFile(small_rec / "train.rec", small_rec / "train.idx"))
    packed = read_layout(RecordFile(tmp_path / "rec/train.rec", tmp_path / "rec/train.idx"))
    assert np.array_equal(original.labels, packed.labels) and np.array_equal(original.image_keys, packed.image_keys)


def test_extension_comes_from_the_bytes(tmp_path):
    from hfs.data.synthetic import SyntheticFaces, encode_jpeg, encode_png

    img = SyntheticFaces(image_size=16).image(0, 0)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(pack(0.0, encode_png(img)), key=0)  # plain im2rec: labels in the headers
        w.write(pack(1.0, encode_jpeg(img)), key=1)
    rec_to_images(tmp_path, tmp_path / "out", val_ratio=0.0)
    paths, labels = read_image_list(tmp_path / "out/train_list.txt")
    assert paths == ["images/0/0.png", "images/1/1.jpg"] and labels.tolist() == [0, 1]
    assert read_property(tmp_path / "out/property") == (2, 16, 16)
    assert image_extension(b"RIFF\0\0\0\0WEBPVP8 ") == "webp" and image_extension(b"nope") is None


def test_val_split_deterministic_per_identity():
    labels = np.repeat(np.arange(50), 20)
    a, b = split_per_identity(labels, 0.1, seed=7), split_per_identity(labels, 0.1, seed=7)
    assert np.array_equal(a, b) and not np.array_equal(a, split_per_identity(labels, 0.1, seed=8))
    assert np.bincount(labels[a], minlength=50).tolist() == [2] * 50
    singles = split_per_identity(np.arange(5), 0.5, seed=0)
    assert not singles.any()  # every identity keeps a training image
    with pytest.raises(HfsError, match="val ratio"):
        split_per_identity(labels, 1.0, 0)


def test_resume_after_a_kill(small_rec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = convert_mod.atomic_write_bytes
    calls = {"n": 0}

    def dying_write(path, data, fsync=True):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt  # the run is killed part-way
        real_write(path, data, fsync)

    monkeypatch.setattr(convert_mod, "atomic_write_bytes", dying_write)
    with pytest.raises(KeyboardInterrupt):
        rec_to_images(small_rec, out, workers=1)
    monkeypatch.setattr(convert_mod, "atomic_write_bytes", real_write)
    written = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert len(written) == 12 and not (out / "train_list.txt").exists()
    stale = written[0].parent / ".5.jpg.abcd.tmp"  # what a SIGKILL mid-write leaves behind
    stale.write_bytes(b"half")
    summary = rec_to_images(small_rec, out, workers=1, resume=True)
    assert summary.skipped == 12 and not stale.exists()
    rec_to_images(small_rec, tmp_path / "fresh", workers=1)
    assert _tree(out) == _tree(tmp_path / "fresh")


def test_pack_tree_with_named_classes(tmp_path):
    from hfs.data.synthetic import SyntheticFaces, encode_png

    faces = SyntheticFaces(image_size=16)
    for name, cls in (("bob", 0), ("alice", 1)):
        for v in range(2):
            (tmp_path / "in" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / name / f"{v}.png").write_bytes(encode_png(faces.image(cls, v)))
    summary = images_to_rec(tmp_path / "in", tmp_path / "rec")
    assert summary.images == 4 and summary.identities == 2
    assert (tmp_path / "rec/classes.txt").read_text() == "0\talice\n1\tbob\n"
    layout = read_layout(RecordFile(tmp_path / "rec/train.rec", tmp_path / "rec/train.idx"))
    assert layout.labels.tolist() == [0, 0, 1, 1]
    assert read_property(tmp_path / "rec/property") == (2, 16, 16)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True)


def test_corrupt_rec_is_one_line_error_and_no_lists(small_rec, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.idx", "property"):
        (bad / name).write_bytes((small_rec / name).read_bytes())
    data = bytearray((small_rec / "train.rec").read_bytes())
    keys, offsets = read_index(small_rec / "train.idx")
    target = int(offsets[list(keys).index(7)])
    data[target:target + 4] = b"\0\0\0\0"
    (bad / "train.rec").write_bytes(bytes(data))
    proc = _cli("convert", "--in-folder", str(bad), "--out-folder", str(tmp_path / "out"), "--workers", "2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"byte offset {target}" in lines[-1] and "train.rec" in lines[-1]
    assert not (tmp_path / "out/train_list.txt").exists()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_cli_round_trip_and_missing_index(small_rec, tmp_path):
    proc = _cli("convert", "--in-folder", str(small_rec), "--out-folder", str(tmp_path / "a"), "-j", "1")
    assert proc.returncode == 0, proc.stderr
    assert "30 images of 6 identities" in proc.stdout
    proc = _cli("convert", "--to", "rec", "--in-folder", str(tmp_path / "a"), "--out-folder", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r/train.rec").read_bytes() == (small_rec / "train.rec").read_bytes()
    proc = _cli("convert", "--in-folder", str(tmp_path / "a"), "--out-folder", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: RecordIO file not found")


def test_missing_listed_image_is_named(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/train_list.txt").write_text("images/0/1.jpg 0\n")
    with pytest.raises(HfsError, match="image not found: .*images/0/1.jpg"):
        images_to_rec(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_cli_rec_name_and_val_ratio(small_rec, tmp_path):
    import shutil

    named = tmp_path / "named"
    named.mkdir()
    for suffix in (".rec", ".idx"):
        shutil.copy(small_rec / f"train{suffix}", named / f"ms1m{suffix}")
    shutil.copy(small_rec / "property", named / "property")
    proc = _cli("convert", "--in-folder", str(named), "--out-folder", str(tmp_path / "a"), "--rec-name", "ms1m",
                "--val-ratio", "0.4", "-j", "1")
    assert proc.returncode == 0, proc.stderr
    (train, _), (val, val_labels) = (read_image_list(tmp_path / "a/train_list.txt"),
                                     read_image_list(tmp_path / "a/val_list.txt"))
    assert len(train) == 18 and len(val) == 12 and np.bincount(val_labels).tolist() == [2] * 6  # 2 of 5 each
    proc = _cli("convert", "--to", "rec", "--in-folder", str(tmp_path / "a"), "--out-folder", str(tmp_path / "r"),
                "--rec-name", "packed")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r/packed.rec").exists() and (tmp_path / "r/packed.idx").exists()
    proc = _cli("convert", "--in-folder", str(named), "--out-folder", str(tmp_path / "b"), "--val-ratio", "0.95")
    assert proc.returncode == 2 and "--val-ratio" in proc.stderr
