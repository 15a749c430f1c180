"""`hfs export`: the exported backbone reproduces the checkpoint's embeddings, and scores the same."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.eval.helpers import invoke_ok
from hfs.config import load_config
from hfs.eval.extract import read_features
from hfs.utils.errors import HfsError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hfs.eval.export import ONNX_OPSET, export_checkpoint  # noqa: E402  (after the skips)


def _save_tiny_checkpoint(run, arch="tiny", seed=0):
    """A checkpoint of a freshly initialised `tiny` backbone (8x8 input, 16-D), with BN statistics
    that are not the identity, so a wrong BN export would show."""
    from hfs.models import build_backbone
    from hfs.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.arch=tiny", "model.embedding_size=16", "data.image_size=8"])
    torch.manual_seed(seed)
    model = build_backbone(cfg.model, cfg.data.image_size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))  # moves the running means and variances
    saved = cfg.to_dict()
    saved["model"]["arch"] = arch
    return save_checkpoint(run, 7, {"config": saved, "backbone": model.state_dict()}, keep=1)


def _torch_model(checkpoint):
    from hfs.models.loading import load_backbone

    return load_backbone(checkpoint)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint exported once to ONNX + TorchScript (fp32) and to ONNX fp16."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = _save_tiny_checkpoint(folder / "run")
    fp32 = export_checkpoint(folder / "run", onnx=folder / "m.onnx", torchscript=folder / "m.pt")
    fp16 = export_checkpoint(checkpoint, onnx=folder / "half" / "m16.onnx", fp16=True)
    return {"checkpoint": checkpoint, "fp32": fp32, "fp16": fp16, "folder": folder}


def _images(batch, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, 8, 8)).astype(np.float32)


def _ort_run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def test_export_result_names_the_files_and_the_checkpoint(exported):
    result = exported["fp32"]
    assert result.checkpoint == exported["checkpoint"]  # the run folder resolved to its latest
    assert result.files == {"onnx": exported["folder"] / "m.onnx", "torchscript": exported["folder"] / "m.pt"}
    assert (result.arch, result.image_size, result.embedding_size, result.fp16) == ("tiny", 8, 16, False)
    assert result.max_rel_diff["onnx"] < 1e-4
    assert not list(exported["folder"].glob(".*.tmp"))  # no temp file left behind


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_torch_embeddings(exported, batch):
    images = _images(batch)
    with torch.no_grad():
        expected = _torch_model(exported["checkpoint"])(torch.from_numpy(images)).numpy()
    got = _ort_run(exported["folder"] / "m.onnx", images)
    assert got.shape == (batch, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_onnx_graph_has_the_documented_interface(exported):
    model = onnx.load(str(exported["folder"] / "m.onnx"))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == ONNX_OPSET == 18
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "embedding"
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].dim_value  # a named, dynamic batch dimension
    assert [d.dim_value for d in in_dims[1:]] == [3, 8, 8]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["hfs.arch"] == "tiny" and props["hfs.image_size"] == "8" and props["hfs.precision"] == "fp32"
    assert props["hfs.checkpoint"] == exported["checkpoint"].name
    # Only the backbone: no weight the size of the classifier, and every weight belongs to the backbone.
    sizes = sorted(np.prod(i.dims) for i in model.graph.initializer)
    backbone = _torch_model(exported["checkpoint"])
    assert sum(sizes) <= sum(p.numel() for p in backbone.state_dict().values())


def test_fp16_export_runs_with_float32_io_and_float16_weights(exported):
    path = exported["folder"] / "half" / "m16.onnx"
    model = onnx.load(str(path))
    types = {i.data_type for i in model.graph.initializer if np.prod(i.dims) > 1}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    assert {p.key: p.value for p in model.metadata_props}["hfs.precision"] == "fp16"
    assert exported["fp16"].fp16 and exported["fp16"].files == {"onnx": path}
    images = _images(7)
    with torch.no_grad():
        expected = _torch_model(exported["checkpoint"])(torch.from_numpy(images)).numpy()
    got = _ort_run(path, images)
    assert got.dtype == np.float32
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-2 * scale)
    assert np.abs(got - expected).max() > 0  # it really is a different (half-precision) computation


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("batch", [1, 7])
def test_torchscript_matches_torch_embeddings(exported, batch):
    images = torch.from_numpy(_images(batch))
    extra = {"hfs.json": ""}
    module = torch.jit.load(str(exported["folder"] / "m.pt"), _extra_files=extra)
    with torch.no_grad():
        expected = _torch_model(exported["checkpoint"])(images)
        got = module(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert json.loads(extra["hfs.json"])["hfs.arch"] == "tiny"


_invoke = invoke_ok


@pytest.mark.parametrize("flip", [False, True])
def test_extract_with_onnx_gives_the_checkpoints_features(tmp_path, tiny_bin, exported, flip):
    flag = "--flip" if flip else "--no-flip"
    common = ["--bin", tiny_bin, flag, "--batch-size", 7, "--num-workers", 0]
    _invoke("extract", "--checkpoint", exported["checkpoint"], "--out", tmp_path / "ckpt.npy", *common)
    _invoke("extract", "--checkpoint", exported["folder"] / "m.onnx", "--out", tmp_path / "onnx.npy", *common)
    np.testing.assert_allclose(read_features(tmp_path / "onnx.npy"), read_features(tmp_path / "ckpt.npy"),
                               rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / "onnx.json").read_text())
    assert meta["format"] == "onnx" and meta["arch"] == "tiny" and meta["image_size"] == 8
    assert meta["checkpoint"] == str(exported["folder"] / "m.onnx") and meta["flip"] is flip


@pytest.mark.parametrize("model, tol", [("m.onnx", 1e-6), ("half/m16.onnx", 1e-3)], ids=["fp32", "fp16"])
def test_verify_with_onnx_scores_like_the_checkpoint(tmp_path, tiny_bin, exported, model, tol):
    common = ["--bin", tiny_bin, "--folds", 5, "--num-workers", 0, "--flip"]
    _invoke("verify", "--checkpoint", exported["checkpoint"], *common, "--json", tmp_path / "ckpt.json")
    _invoke("verify", "--checkpoint", exported["folder"] / model, *common, "--json", tmp_path / "onnx.json")
    a = json.loads((tmp_path / "ckpt.json").read_text())["tiny"]
    b = json.loads((tmp_path / "onnx.json").read_text())["tiny"]
    assert b["format"] == "onnx" and "format" not in a
    assert a["accuracy"] == b["accuracy"] == 1.0  # same pairs are identical images
    for key in ("auc", "eer", "val", "far"):
        assert b[key] == pytest.approx(a[key], abs=tol), key
    assert b["best_threshold"] == pytest.approx(a["best_threshold"], abs=0.011)  # thresholds step by 0.01


@pytest.mark.slow
def test_cli_export_in_a_subprocess(tmp_path, exported):
    out = tmp_path / "deploy" / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "hfs", "export", "--checkpoint", str(exported["checkpoint"]),
                           "--onnx", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX opset 18" in proc.stdout and "tiny backbone" in proc.stdout
    np.testing.assert_allclose(_ort_run(out, _images(3)), _ort_run(exported["folder"] / "m.onnx", _images(3)),
                               rtol=1e-6, atol=1e-6)  # the same export, run the same way


def _hfs_error(*args):
    proc = subprocess.run([sys.executable, "-m", "hfs", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_checkpoint_is_one_error_line_in_a_subprocess(tmp_path):
    out = tmp_path / "m.onnx"
    assert _hfs_error("export", "--checkpoint", tmp_path / "nope.pt", "--onnx", out) == \
        f"error: checkpoint {tmp_path / 'nope.pt'} does not exist"
    assert not out.exists()


def test_unknown_backbone_and_empty_latest(tmp_path):
    odd = _save_tiny_checkpoint(tmp_path / "run", arch="resnet9000")
    with pytest.raises(HfsError, match=r"checkpoint .*step-00000007.pt: .*unknown backbone 'resnet9000'"):
        export_checkpoint(odd, onnx=tmp_path / "m.onnx")
    with pytest.raises(HfsError, match="--checkpoint latest: no checkpoint in"):
        export_checkpoint("latest", onnx=tmp_path / "m.onnx", output_dir=tmp_path / "empty")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"onnx": "{file}/m.onnx"}, "--onnx {file}/m.onnx: {file} is not a folder"),
    ({"onnx": "{tmp}/m.txt"}, "--onnx {tmp}/m.txt: give a path ending in .onnx"),
    ({"onnx": "{tmp}"}, "--onnx {tmp} is a folder"),
    ({"torchscript": "{file}/m.pt"}, "--torchscript {file}/m.pt: {file} is not a folder"),
    ({"onnx": "{tmp}/m.onnx", "torchscript": "{tmp}/m.onnx"}, "name the same file"),
    ({}, "nothing to export"),
], ids=["under-a-file", "suffix", "folder", "torchscript-under-a-file", "same-file", "no-output"])
def test_output_is_checked_before_the_checkpoint_is_read(tmp_path, kwargs, fragment):
    """The checkpoint here does not exist: the output's error comes first, so no work is done."""
    file = tmp_path / "plain.txt"
    file.write_text("x")
    fill = {"file": file, "tmp": tmp_path}
    with pytest.raises(HfsError) as err:
        export_checkpoint(tmp_path / "missing.pt", **{k: v.format(**fill) for k, v in kwargs.items()})
    assert fragment.format(**fill) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes to read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "not writable" in _hfs_error("export", "--checkpoint", tmp_path / "x.pt", "--onnx", folder / "m.onnx")
    finally:
        folder.chmod(0o700)


def test_a_failed_check_writes_nothing(tmp_path, exported, monkeypatch):
    import hfs.eval.export as export

    monkeypatch.setattr(export, "TOLERANCE", {False: -1.0, True: -1.0})
    with pytest.raises(HfsError, match="differs from the checkpoint's"):
        export_checkpoint(exported["checkpoint"], onnx=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_say_how_to_install(tmp_path, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(HfsError, match=r"--onnx needs the onnxruntime package: pip install onnx onnxruntime onnxscript \(or, in the hfs checkout, pip install -e '\.\[onnx\]'\)"):
        export_checkpoint(exported["checkpoint"], onnx=tmp_path / "m.onnx")
    with pytest.raises(HfsError, match=r"needs the onnxruntime package: pip install onnx onnxruntime onnxscript \(or, in the hfs checkout, pip install -e '\.\[onnx\]'\)"):
        from hfs.eval.evaluate import load_embedding_model

        load_embedding_model(exported["folder"] / "m.onnx")


@pytest.mark.slow
def test_extract_refuses_a_file_that_is_not_onnx(tmp_path, tiny_bin):
    from hfs.eval.evaluate import extract_checkpoint

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"definitely not protobuf")
    line = _hfs_error("extract", "--checkpoint", bad, "--bin", tiny_bin, "--out", tmp_path / "f.npy")
    assert line.startswith(f"error: {bad} is not a model onnxruntime can load")
    with pytest.raises(HfsError, match=f"--checkpoint {tmp_path / 'gone.onnx'} does not exist"):
        extract_checkpoint(tmp_path / "gone.onnx", tmp_path / "f.npy", bin_path=tiny_bin)
    assert not (tmp_path / "f.npy").exists()
