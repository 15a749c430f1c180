"""`hfs bench-loader` runs on a tiny generated set and writes valid JSON (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from hfs.bench.loader import LoaderBenchSettings, available_decoders, run_loader_bench
from hfs.utils.errors import HfsError


@pytest.fixture
def one_torch_thread():
    """The 0-worker loader runs here; intra-op threads only slow tiny tensors on a shared box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_report_measures_every_decoder_and_worker_count(one_torch_thread):
    pytest.importorskip("simplejpeg")
    s = LoaderBenchSettings(images=60, image_size=32, batch_size=8, batches=2, workers=[0, 1], decode_images=10)
    report = run_loader_bench(s)
    assert [r["decoder"] for r in report["decode_loop"]] == ["pil", "simplejpeg"]
    assert [(r["decoder"], r["workers"]) for r in report["loader"]] == [
        ("pil", 0), ("pil", 1), ("simplejpeg", 0), ("simplejpeg", 1)]
    for r in report["loader"]:
        assert r["images"] == 16 and r["batch_shape"] == [8, 3, 32, 32] and r["images_per_s"] > 0
    assert report["decode_loop"][0]["images"] == 10 and report["dataset"]["images"] == 60
    assert report["skipped_decoders"] == [] and report["context"]["versions"]["simplejpeg"]


def test_missing_decoder_is_skipped_and_unknown_one_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    assert available_decoders(["pil", "simplejpeg"]) == (["pil"], ["simplejpeg"])
    with pytest.raises(HfsError, match="unknown decoder 'turbo'"):
        available_decoders(["turbo"])


def test_cli_writes_json(tmp_path, one_torch_thread):
    from typer.testing import CliRunner

    from hfs.cli import app

    out = tmp_path / "loader.json"
    result = CliRunner().invoke(app, ["bench-loader", "--images", "40", "--image-size", "16", "--batch-size", "8",
                                      "--batches", "1", "--workers", "0", "--decoders", "pil", "--decode-images", "5",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(r["decoder"], r["workers"]) for r in report["loader"]] == [("pil", 0)]
    assert report["settings"]["batch_size"] == 8 and "images/s" in result.output


@pytest.mark.slow
def test_cli_data_folder_without_rec_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hfs", "bench-loader", "--data", str(tmp_path), "--decoders", "pil"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and str(tmp_path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
