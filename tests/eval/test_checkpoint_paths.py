"""`hfs extract` / `hfs verify --checkpoint` against a real (tiny) hfs checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.eval.helpers import invoke_ok, save_untrained_checkpoint
from hfs.data.bins import load_bin
from hfs.eval.extract import read_features


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of an untrained `tiny` backbone taking 8x8 inputs (the .bin stores 12x12)."""
    return save_untrained_checkpoint(tmp_path / "run", 8, 5)


_invoke = invoke_ok


@pytest.mark.parametrize("flip", [False, True])
def test_features_and_checkpoint_paths_agree(tmp_path, tiny_bin, checkpoint, flip):
    flag = "--flip" if flip else "--no-flip"
    feats = tmp_path / "feats.npy"
    _invoke("extract", "--checkpoint", checkpoint, "--bin", tiny_bin, "--out", feats, flag, "--batch-size", 7,
            "--num-workers", 0, "--device", "cpu")
    meta = json.loads(feats.with_suffix(".json").read_text())
    assert meta == {"arch": "tiny", "bin": str(tiny_bin), "checkpoint": str(checkpoint), "count": 40, "dim": 16,
                    "dtype": "float32", "flip": flip, "image_size": 8}
    assert read_features(feats).shape == (40, 16)
    _invoke("verify", "--bin", tiny_bin, "--features", feats, "--folds", 5, "--json", tmp_path / "a.json")
    _invoke("verify", "--bin", tiny_bin, "--checkpoint", checkpoint.parent.parent, flag, "--folds", 5,
            "--num-workers", 0, "--json", tmp_path / "b.json")  # a run folder means its latest checkpoint
    a = json.loads((tmp_path / "a.json").read_text())["tiny"]
    b = json.loads((tmp_path / "b.json").read_text())["tiny"]
    assert b["checkpoint"] == str(checkpoint) and b["flip"] is flip  # the file the run folder resolved to
    for key in ("accuracy", "accuracy_std", "best_threshold", "val", "far", "auc", "eer", "fold_thresholds"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["accuracy"] == 1.0  # same pairs are identical images


def test_extract_from_an_image_list(tmp_path, tiny_bin, checkpoint):
    images, _ = load_bin(tiny_bin)
    (tmp_path / "data" / "images" / "0").mkdir(parents=True)
    lines = []
    for k, img in enumerate(images[:6]):
        (tmp_path / "data" / "images" / "0" / f"{k}.png").write_bytes(img)
        lines.append(f"images/0/{k}.png 0")
    (tmp_path / "data" / "val_list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "list.npy"
    _invoke("extract", "--checkpoint", checkpoint, "--list", tmp_path / "data" / "val_list.txt", "--out", out,
            "--num-workers", 0)
    from_bin = tmp_path / "bin.npy"
    _invoke("extract", "--checkpoint", checkpoint, "--bin", tiny_bin, "--out", from_bin, "--num-workers", 0)
    np.testing.assert_allclose(read_features(out), read_features(from_bin)[:6], rtol=1e-4, atol=1e-5)  # other batch split
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prefix"] == str(tmp_path / "data") and meta["count"] == 6


@pytest.mark.parametrize("args, out_name, bad_checkpoint, fragment", [
    (["--bin", "{bin}", "--list", "{bin}"], "f.npy", False, "exactly one of --bin"),
    ([], "f.npy", False, "exactly one of --bin"),
    (["--bin", "{bin}"], "f.txt", False, "ending in .npy"),
    (["--bin", "{bin}"], "f.npy", True, "not a readable hfs checkpoint"),
], ids=["both-sources", "no-source", "not-npy", "corrupt-checkpoint"])
def test_extract_bad_input_is_one_line_exit_2(tmp_path, tiny_bin, checkpoint, args, out_name, bad_checkpoint,
                                              fragment):
    out = tmp_path / out_name
    if bad_checkpoint:
        checkpoint = tmp_path / "garbage.pt"
        checkpoint.write_bytes(b"not a checkpoint")
    argv = [a.format(bin=tiny_bin) for a in args]
    proc = subprocess.run([sys.executable, "-m", "hfs", "extract", "--checkpoint", str(checkpoint), "--out", str(out),
                           *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_verify_refuses_both_or_neither_source(tiny_bin, checkpoint, tmp_path):
    np.save(tmp_path / "f.npy", np.ones((40, 4), np.float32))
    proc = subprocess.run([sys.executable, "-m", "hfs", "verify", "--bin", str(tiny_bin), "--checkpoint",
                           str(checkpoint), "--features", str(tmp_path / "f.npy")], capture_output=True, text=True)
    assert proc.returncode == 2 and "either --features" in proc.stderr
