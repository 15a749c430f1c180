"""Every command that writes checks its output paths before any work starts (issue 15, items 1 and 13).

A file where a folder must go (or a folder where a file must go) is refused at once with one
`error:` line naming the flag or config key, exit code 2, and nothing written.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfs.utils.errors import HfsError
from hfs.utils.writable import require_writable_dir, require_writable_file

TINY_TRAIN = ["--set", "data.synthetic_classes=4", "--set", "data.synthetic_images_per_class=4",
              "--set", "data.image_size=16", "--set", "data.num_workers=0", "--set", "model.arch=tiny",
              "--set", "model.embedding_size=8", "--set", "train.batch_size=8", "--set", "train.max_steps=1"]


def hfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=timeout)


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_require_writable_dir_and_file(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    require_writable_dir(tmp_path / "new" / "deeper", "--out")  # creatable: fine, nothing made
    assert not (tmp_path / "new").exists()
    with pytest.raises(HfsError, match=r"^--out .*/f: is a file, not a folder"):
        require_writable_dir(a_file, "--out")
    with pytest.raises(HfsError, match=r"^--out .*/f/sub: .*/f is a file, not a folder"):
        require_writable_dir(a_file / "sub", "--out")
    with pytest.raises(HfsError, match=r"^--json .*: is a folder, not a file"):
        require_writable_file(tmp_path, "--json")
    with pytest.raises(HfsError, match=r"^--json .*/f/x.json: .*/f is a file, not a folder"):
        require_writable_file(a_file / "x.json", "--json")
    require_writable_file(tmp_path / "x.json", "--json")


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(HfsError, match=r"^config key 'train.output_dir' .*: .* is not writable"):
        require_writable_dir(tmp_path / "run", "config key 'train.output_dir'")


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("a file where a folder must go")
    return path


def test_serve_params_snapshot_dir_that_is_a_file(a_file):
    line = one_error(hfs("serve-params", "--port", "5599", "--snapshot-dir", str(a_file), timeout=30))
    assert line.startswith("error: --snapshot-dir ") and "is a file" in line


def test_serve_params_snapshot_dir_key_is_named(a_file):
    line = one_error(hfs("serve-params", "--port", "5599", "--set", f"paramserver.snapshot_dir={a_file}", timeout=30))
    assert "paramserver.snapshot_dir" in line


def test_train_output_dir_that_is_a_file(a_file):
    line = one_error(hfs("train", *TINY_TRAIN, "--set", f"train.output_dir={a_file}"))
    assert "train.output_dir" in line and "is a file" in line


def test_train_sampled_snapshot_dir_that_is_a_file(a_file, tmp_path):
    line = one_error(hfs("train", "--sampled", *TINY_TRAIN, "--set", f"train.output_dir={tmp_path / 'run'}",
                         "--set", f"paramserver.snapshot_dir={a_file}"))
    assert "paramserver.snapshot_dir" in line
    assert not (tmp_path / "run").exists()


def test_train_dist_output_dir_that_is_a_file(a_file):
    line = one_error(hfs("train-dist", "--nproc", "1", *TINY_TRAIN, "--set", f"train.output_dir={a_file}"))
    assert "train.output_dir" in line


def test_make_synthetic_and_convert_out_folder(a_file, tmp_path):
    line = one_error(hfs("make-synthetic", "--out", str(a_file), "--num-classes", "2", "--images-per-class", "1",
                         "--image-size", "8"))
    assert line.startswith("error: --out ") and "is a file" in line
    (tmp_path / "in").mkdir()
    line = one_error(hfs("convert", "--in-folder", str(tmp_path / "in"), "--out-folder", str(a_file)))
    assert line.startswith("error: --out-folder ")


def test_extract_out_in_a_file_fails_before_any_feature(a_file, tmp_path):
    """Item 13: no checkpoint is even read when --out cannot be written."""
    line = one_error(hfs("extract", "--checkpoint", str(tmp_path / "no-such.pt"), "--bin", str(tmp_path / "x.bin"),
                         "--out", str(a_file / "f.npy")))
    assert line.startswith("error: --out ") and "is a file, not a folder" in line


def test_verify_json_folder_names_the_flag(tmp_path):
    """Item 13: a folder given to --json is named as the flag, not as a temp file."""
    line = one_error(hfs("verify", "--bin", str(tmp_path / "x.bin"), "--features", str(tmp_path / "x.npy"),
                         "--json", str(tmp_path)))
    assert line.startswith("error: --json ") and "is a folder" in line and ".tmp" not in line
    line = one_error(hfs("verify", "--bin", str(tmp_path / "x.bin"), "--features", str(tmp_path / "x.npy"),
                         "--plot", str(tmp_path)))
    assert line.startswith("error: --plot ")


@pytest.mark.parametrize("command", [
    ["bench-paramserver", "--json"],
    ["bench-sampler", "--num-classes", "10", "--dim", "2", "--samplers", "random", "--json"],
    ["bench-fc", "--num-classes", "10", "--dim", "2", "--json"],
])
@pytest.mark.slow
def test_bench_json_folder(command, tmp_path):
    line = one_error(hfs(*command, str(tmp_path)))
    assert line.startswith("error: --json ") and "is a folder" in line


@pytest.mark.parametrize("command, flag", [
    (["export", "--checkpoint", "runs/none"], "--onnx"),
    (["eval-ijb", "--root", "nowhere"], "--json"),
    (["bench-loader"], "--json"),
])
@pytest.mark.slow
def test_newer_commands_check_their_outputs_too(command, flag, tmp_path):
    line = one_error(hfs(*command, flag, str(tmp_path)))
    assert line.startswith(f"error: {flag} ") and "is a folder" in line
