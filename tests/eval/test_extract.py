import json

import numpy as np
import pytest
import torch

from hfs.data.bins import load_bin
from hfs.data.transforms import EvalTransform
from hfs.eval.evaluate import VerificationSet, evaluate_bins, verify_feature_files
from hfs.eval.extract import (EncodedImages, extract_features, list_image_paths, read_features,
                              write_features)
from hfs.utils.errors import HfsError


def _reference(model, images, size, flip=False):
    x = torch.stack([EvalTransform(size)(img) for img in images])
    with torch.no_grad():
        out = model(x)
        if flip:
            out = out + model(torch.flip(x, dims=[3]))
    return out.numpy()


def test_features_match_a_plain_forward_pass_and_resize(tiny_bin, tiny_model):
    images, _ = load_bin(tiny_bin)  # stored 12x12, the model takes 8x8: resized on the way
    tiny_model.train()
    feats = extract_features(tiny_model, EncodedImages(images, 8, "tiny.bin"), batch_size=7, show_progress=False)
    assert tiny_model.training  # restored for the trainer
    assert feats.dtype == np.float32 and feats.shape == (40, 16)
    tiny_model.eval()
    np.testing.assert_allclose(feats, _reference(tiny_model, images, 8), rtol=1e-5, atol=1e-6)


def test_flip_adds_the_mirror_embedding(tiny_bin, tiny_model):
    images, _ = load_bin(tiny_bin)
    feats = extract_features(tiny_model, EncodedImages(images, 8, "tiny.bin"), flip=True, show_progress=True)
    tiny_model.eval()
    np.testing.assert_allclose(feats, _reference(tiny_model, images, 8, flip=True), rtol=1e-5, atol=1e-5)


def test_evaluate_bins_scores_identical_pairs_perfectly(tiny_bin, tiny_model):
    out = evaluate_bins(tiny_model, [tiny_bin], image_size=8, batch_size=16, flip=True, device="cpu", folds=5)
    assert list(out) == ["tiny"]
    assert out["tiny"]["accuracy"] == 1.0 and out["tiny"]["pairs"] == 20 and out["tiny"]["auc"] == 1.0
    again = evaluate_bins(tiny_model, [VerificationSet.load(tiny_bin)], image_size=8, folds=5)
    assert again["tiny"]["accuracy"] == 1.0


def test_broken_image_in_a_worker_is_one_line_naming_file_and_index(tiny_bin, tiny_model):
    images, _ = load_bin(tiny_bin)
    images[3] = b"not an image"
    with pytest.raises(HfsError) as err:
        extract_features(tiny_model, EncodedImages(images, 8, "bad.bin"), batch_size=4, num_workers=1,
                         show_progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("bad.bin: image 3 cannot be decoded")


def test_image_list_with_prefix(tmp_path, tiny_model):
    from PIL import Image

    (tmp_path / "imgs" / "7").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "7" / f"{k}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("7/0.png 7\n7/1.png 7\n\n7/2.png 7\n")
    paths = list_image_paths(lst, tmp_path / "imgs")
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png"]
    feats = extract_features(tiny_model, EncodedImages(paths, 8, str(lst)), show_progress=False)
    assert feats.shape == (3, 16)
    lst.write_text("7/0.png 7\n7/missing.png 7\n")
    with pytest.raises(HfsError, match=r"image 1 \(.*missing.png\) cannot be decoded"):
        extract_features(tiny_model, EncodedImages(list_image_paths(lst, tmp_path / "imgs"), 8, str(lst)),
                         show_progress=False)
    with pytest.raises(HfsError, match="cannot read image list"):
        list_image_paths(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(HfsError, match="is empty"):
        list_image_paths(tmp_path / "empty.txt", tmp_path)


def test_write_and_read_features(tmp_path):
    feats = np.random.default_rng(0).normal(size=(6, 4))
    meta_path = write_features(tmp_path / "f.npy", feats, {"arch": "tiny", "flip": True})
    assert meta_path.name == "f.json"
    meta = json.loads(meta_path.read_text())
    assert meta["count"] == 6 and meta["dim"] == 4 and meta["arch"] == "tiny" and meta["flip"] is True
    back = read_features(tmp_path / "f.npy")
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, feats.astype(np.float32))
    with pytest.raises(HfsError, match="ending in .npy"):
        write_features(tmp_path / "f.txt", feats, {})


@pytest.mark.parametrize("content, match", [
    (lambda p: p.write_bytes(b"garbage"), "not a readable .npy"),
    (lambda p: np.save(p, np.zeros(5)), "expected a 2-D float array"),
    (lambda p: np.save(p, np.full((2, 2), np.nan)), "NaN"),
])
def test_bad_feature_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.npy"
    content(path)
    with pytest.raises(HfsError, match=match):
        read_features(path)
    with pytest.raises(HfsError, match="does not exist"):
        read_features(tmp_path / "missing.npy")


def test_feature_count_must_be_twice_the_pairs(tmp_path, tiny_bin):
    np.save(tmp_path / "f.npy", np.ones((39, 4), np.float32))
    with pytest.raises(HfsError) as err:
        verify_feature_files([tiny_bin], [tmp_path / "f.npy"])
    msg = str(err.value)
    assert "39 feature rows" in msg and "20 pairs" in msg and "needs 40" in msg and str(tiny_bin) in msg
    with pytest.raises(HfsError, match="2 --features file"):
        verify_feature_files([tiny_bin], [tmp_path / "f.npy"] * 2)


@pytest.mark.gpu
def test_cuda_amp_matches_cpu(tiny_bin, tiny_model):
    images, _ = load_bin(tiny_bin)
    data = EncodedImages(images, 8, "tiny.bin")
    cpu = extract_features(tiny_model, data, flip=True, device="cpu", show_progress=False)
    gpu = extract_features(tiny_model.cuda(), data, flip=True, device="cuda", show_progress=False)
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2, atol=2e-2)  # fp16 autocast

