import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from hfs.cli import app
from hfs.data.bins import load_bin
from hfs.eval.extract import EncodedImages, extract_features, write_features


def _hfs(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def tiny_features(tmp_path, tiny_bin, tiny_model):
    images, _ = load_bin(tiny_bin)
    feats = extract_features(tiny_model, EncodedImages(images, 8, str(tiny_bin)), show_progress=False)
    out = tmp_path / "tiny.npy"
    write_features(out, feats, {"arch": "tiny", "bin": str(tiny_bin)})
    return out


def test_verify_with_features_prints_one_table_and_writes_json(tmp_path, tiny_bin, tiny_features):
    second = tmp_path / "other" / "tiny.bin"  # same stem: both are shown by their paths
    second.parent.mkdir()
    second.write_bytes(tiny_bin.read_bytes())
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["verify", "--bin", str(tiny_bin), "--bin", str(second),
                                      "--features", str(tiny_features), "--features", str(tiny_features),
                                      "--folds", "5", "--json", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert result.output.count("verification") == 1 and "100.00 ± 0.00" in result.output
    data = json.loads(out.read_text())
    assert set(data) == {str(tiny_bin), str(second)}
    first = data[str(tiny_bin)]
    assert first["accuracy"] == 1.0 and first["folds"] == 5 and first["pairs"] == 20
    assert first["features"] == str(tiny_features) and first["bin"] == str(tiny_bin)


def test_verify_takes_bins_and_folds_from_config(tmp_path, tiny_bin, tiny_features):
    result = CliRunner().invoke(app, ["verify", "--features", str(tiny_features),
                                      "--set", f"eval.bins=[{tiny_bin}]", "--set", "eval.folds=4",
                                      "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["tiny"]["folds"] == 4


def test_verify_feature_count_mismatch_is_one_line_exit_2(tmp_path, tiny_bin):
    np.save(tmp_path / "short.npy", np.ones((10, 4), np.float32))
    proc = _hfs("verify", "--bin", str(tiny_bin), "--features", str(tmp_path / "short.npy"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "10 feature rows" in lines[0]


def test_verify_on_a_file_that_is_not_a_pair_file(tmp_path, tiny_features):
    bad = tmp_path / "notpairs.bin"
    bad.write_bytes(b"this is not a pickle")
    proc = _hfs("verify", "--bin", str(bad), "--features", str(tiny_features))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not a readable verification .bin")


def test_verify_needs_a_set_and_a_source(tiny_bin):
    proc = _hfs("verify")
    assert proc.returncode == 2 and "no verification set" in proc.stderr
    proc = _hfs("verify", "--bin", str(tiny_bin))
    assert proc.returncode == 2 and "--features" in proc.stderr


def test_plot_without_matplotlib_says_how_to_install(tmp_path, tiny_bin, tiny_features, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["verify", "--bin", str(tiny_bin), "--features", str(tiny_features),
                                      "--plot", str(tmp_path / "roc.png")])
    assert result.exit_code != 0
    # `hfs` on the public index is an unrelated package: name what works from this checkout
    assert "hfs[plot]" not in str(result.exception)
    assert "pip install matplotlib" in str(result.exception)
    assert "pip install -e '.[plot]'" in str(result.exception)
    assert not (tmp_path / "roc.png").exists()


def test_plot_help_names_an_install_that_works():
    result = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "300"})
    assert "hfs[plot]" not in result.output and "pip install matplotlib" in result.output


def test_plot_draws_a_png(tmp_path, tiny_bin, tiny_features):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(app, ["verify", "--bin", str(tiny_bin), "--features", str(tiny_features),
                                      "--folds", "5", "--plot", str(tmp_path / "roc.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "roc.png").read_bytes().startswith(b"\x89PNG")


def test_features_from_another_set_are_flagged(tmp_path, tiny_bin, tiny_features, caplog):
    from hfs.eval.evaluate import verify_feature_files

    other = tmp_path / "lfw.bin"
    other.write_bytes(tiny_bin.read_bytes())
    with caplog.at_level("WARNING"):
        verify_feature_files([other], [tiny_features], folds=5)
    assert "was extracted from" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        verify_feature_files([tiny_bin], [tiny_features], folds=5)
    assert caplog.text == ""
