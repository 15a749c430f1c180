import io

import numpy as np
import torch
from PIL import Image

from hfs.data.bins import load_bin
from hfs.data.recordio import RecordFile, read_layout, read_property
from hfs.data.synthetic import (SyntheticFaces, SyntheticIdentities, encode_png, synthetic_verification_pairs,
                                write_synthetic_rec)


def test_images_are_deterministic_and_any_size():
    a, b = SyntheticFaces(seed=3, image_size=48), SyntheticFaces(seed=3, image_size=48)
    assert np.array_equal(a.image(5, 2), b.image(5, 2))
    b.template(0)  # cache state must not change results
    assert np.array_equal(a.image(7, 0), b.image(7, 0))
    assert not np.array_equal(a.image(5, 2), a.image(5, 3))
    assert not np.array_equal(a.image(5, 2), SyntheticFaces(seed=4, image_size=48).image(5, 2))
    assert SyntheticFaces(image_size=37).image(0, 0).shape == (37, 37, 3)


def test_views_of_one_identity_are_closer_than_other_identities():
    """A learnability proxy on raw pixels: same identity < same cluster < other cluster."""
    faces = SyntheticFaces(seed=0, image_size=40, cluster_size=4)
    x = np.stack([[faces.image(c, v) for v in range(6)] for c in range(16)]).reshape(16, 6, -1).astype(np.float32)

    def dist(c1, v1, c2, v2):
        return float(np.linalg.norm(x[c1, v1] - x[c2, v2]))

    intra = np.mean([dist(c, i, c, j) for c in range(16) for i in range(6) for j in range(i + 1, 6)])
    same_cluster = np.mean([dist(c, i, c2, i) for c in range(16) for c2 in range(16)
                            if c != c2 and c // 4 == c2 // 4 for i in range(6)])
    other_cluster = np.mean([dist(c, i, c2, i) for c in range(16) for c2 in range(16)
                             if c // 4 != c2 // 4 for i in range(6)])
    assert intra < same_cluster < other_cluster
    # a simple feature (the central face crop, minus each image's mean colour) identifies a
    # held-out view by nearest neighbour far above chance (1/16)
    crop = x.reshape(16, 6, 40, 40, 3)[:, :, 10:30, 10:30]
    feat = (crop - crop.mean(axis=(2, 3), keepdims=True)).reshape(16, 6, -1)
    gallery = feat[:, :5].reshape(-1, feat.shape[-1])
    hits = [np.argmin(np.linalg.norm(gallery - feat[c, 5], axis=1)) // 5 == c for c in range(16)]
    assert np.mean(hits) >= 0.75


def test_dataset_items_and_splits():
    train = SyntheticIdentities(num_classes=3, images_per_class=4, image_size=32, seed=1)
    val = SyntheticIdentities(num_classes=3, images_per_class=4, image_size=32, seed=1, split="val",
                              val_per_class=2)
    assert len(train) == 12 and len(val) == 6
    x, y = train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(train[5][0], train[5][0])  # same item, same augmentation
    assert val[0][1] == 0 and val[5][1] == 2
    # val views are unseen views of the training identities
    seen = {train.faces.image(0, v).tobytes() for v in range(4)}
    assert val.faces.image(0, int(val.plan.val_items([0])[1][0])).tobytes() not in seen
    assert train.labels().tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_write_synthetic_rec_matches_generator(tmp_path):
    stats = write_synthetic_rec(tmp_path, num_classes=3, images_per_class=2, image_size=24, seed=2,
                                start_class=10, fmt="png")
    assert stats["images"] == 6 and stats["identities"] == 3
    rec = RecordFile(tmp_path / "train.rec", tmp_path / "train.idx")
    layout = read_layout(rec)
    assert layout.num_classes == 3 and layout.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert read_property(tmp_path / "property") == (3, 24, 24)
    faces = SyntheticFaces(seed=2, image_size=24)
    header, data = rec.read_image(int(layout.image_keys[3]))
    assert header.label == 1.0 and data == encode_png(faces.image(11, 1))


def test_make_synthetic_writes_the_messy_regimes_as_the_label_plan_lays_them_out(tmp_path):
    from typer.testing import CliRunner

    from hfs.cli import app
    from hfs.data.plan import LabelPlan, Regime

    result = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "m"), "--num-classes", "20",
                                      "--images-per-class", "5", "--image-size", "16", "--seed", "3", "--format", "png",
                                      "--duplicates", "0.2", "--label-noise", "0.25", "--min-views", "2"])
    assert result.exit_code == 0, result.output
    plan = LabelPlan(20, 5, Regime(0.2, 0.25, 2), val_views=0, seed=3)
    rec = RecordFile(tmp_path / "m/train.rec", tmp_path / "m/train.idx")
    layout = read_layout(rec)
    identity, view, label = plan.train_items(np.arange(plan.train_size))
    order = np.argsort(label, kind="stable")  # each label's images together, a mislabelled one with its label's
    identity, view, label = identity[order], view[order], label[order]
    assert layout.labels.tolist() == label.tolist() and len(layout.labels) < 100
    twin = int(np.flatnonzero(plan.identity_of(np.arange(20))[0] != np.arange(20))[0])
    first = int(np.flatnonzero((identity == plan.identity_of([twin])[0][0]) & (view >= 5))[0])
    _, data = rec.read_image(int(layout.image_keys[first]))
    assert data == encode_png(SyntheticFaces(seed=3, image_size=16).image(int(identity[first]), int(view[first])))
    bad = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "x"), "--num-classes", "4",
                                   "--images-per-class", "3", "--min-views", "5"])
    assert bad.exit_code != 0 and "--min-views must be in [0, 3]" in str(bad.exception)


def test_verification_pairs_balanced_and_deterministic():
    images, issame = synthetic_verification_pairs(10, first_class=100, num_classes=8, image_size=24, seed=0)
    again, issame2 = synthetic_verification_pairs(10, first_class=100, num_classes=8, image_size=24, seed=0)
    assert len(images) == 20 and issame.dtype == bool and issame.sum() == 5
    assert images == again and np.array_equal(issame, issame2)
    with Image.open(io.BytesIO(images[0])) as img:
        assert img.format == "JPEG" and img.size == (24, 24)


def test_make_synthetic_command(tmp_path):
    from typer.testing import CliRunner

    from hfs.cli import app

    result = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "s"), "--classes", "3",
                                      "--images-per-class", "2", "--image-size", "16", "--seed", "5",
                                      "--val-pairs", "6"])
    assert result.exit_code == 0, result.output
    layout = read_layout(RecordFile(tmp_path / "s/train.rec", tmp_path / "s/train.idx"))
    assert layout.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert read_property(tmp_path / "s/property") == (3, 16, 16)
    images, issame = load_bin(tmp_path / "s/val.bin")
    expected = synthetic_verification_pairs(6, first_class=3, num_classes=3, image_size=16, seed=5)
    assert images == expected[0] and issame.tolist() == expected[1].tolist()
    result = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "t"), "--classes", "3",
                                      "--val-pairs", "2", "--val-first-class", "1"])
    assert result.exit_code != 0 and "overlap the training identities" in str(result.exception)
    assert not (tmp_path / "t").exists()


def test_make_synthetic_format_and_cluster_size(tmp_path):
    from typer.testing import CliRunner

    from hfs.cli import app
    from hfs.data.filelist import image_extension

    common = ["--classes", "4", "--images-per-class", "1", "--image-size", "16", "--val-pairs", "0"]
    for name, extra in (("png", ["--format", "png"]), ("c1", ["--cluster-size", "1"]), ("c4", ["--cluster-size", "4"])):
        result = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / name), *common, *extra])
        assert result.exit_code == 0, result.output
    rec = RecordFile(tmp_path / "png/train.rec", tmp_path / "png/train.idx")
    first_key = read_layout(rec).image_keys[0]
    assert image_extension(rec.read_image(first_key)[1]) == "png"

    def images(name):
        r = RecordFile(tmp_path / name / "train.rec", tmp_path / name / "train.idx")
        return [r.read_image(k)[1] for k in read_layout(r).image_keys]

    # clusters of 1 and of 4 draw identities 1..3 around different prototypes: other images
    assert images("c1")[1:] != images("c4")[1:]
    result = CliRunner().invoke(app, ["make-synthetic", "--out", str(tmp_path / "bad"), *common, "--format", "gif"])
    assert result.exit_code != 0 and not (tmp_path / "bad").exists()


def test_make_synthetic_into_an_existing_folder_leaves_no_stale_val_bin(tmp_path):
    """Issue 15 item 16: a second run without --val-pairs removes the first run's val.bin."""
    import subprocess
    import sys

    out = tmp_path / "synth"
    base = [sys.executable, "-m", "hfs", "make-synthetic", "--out", str(out), "--num-classes", "2",
            "--images-per-class", "1", "--image-size", "8"]
    first = subprocess.run([*base, "--val-pairs", "4"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (out / "val.bin").is_file()
    again = subprocess.run([*base, "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert not (out / "val.bin").exists()
    assert "val.bin" in again.stdout + again.stderr  # it says what it removed


def test_readme_make_synthetic_comments_name_the_identities_held_out():
    """Issue 15 item 16: every comment in the README and docs/commands.md about a val.bin's identities
    matches the command below it."""
    import re
    from pathlib import Path

    from hfs.data.synthetic import held_out_identities

    repo = Path(__file__).resolve().parents[2]
    lines = [line for page in ("README.md", "docs/commands.md") for line in (repo / page).read_text().splitlines()]
    checked = 0
    for i, line in enumerate(lines):
        if not line.startswith("hfs make-synthetic") or "--val-pairs" not in line:
            continue
        flags = dict(re.findall(r"--([a-z-]+) (\S+)", line))
        first, count = held_out_identities(int(flags["num-classes"]), int(flags.get("first-class", 0)),
                                           int(flags["val-first-class"]) if "val-first-class" in flags else None,
                                           int(flags["val-classes"]) if "val-classes" in flags else None)
        comment = " ".join(c for c in lines[max(0, i - 3):i] if c.startswith("#"))
        assert f"identities {first}..{first + count - 1}" in comment, (line, comment)
        checked += 1
    assert checked >= 2
