"""benchmarks/index_freshness.py on a tiny case: the live quality of the store's index during training."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import index_freshness  # noqa: E402


def test_overlap_and_mean_sim_ignore_padding():
    sims = np.array([[0.1, 0.9, 0.5, 0.3]])
    assert index_freshness.mean_sim(sims, np.array([[1, 2, -1]])) == pytest.approx(0.7)
    assert index_freshness.overlap(np.array([[1, -1, 3]]), np.array([[1, 2]])) == 0.5


def test_exact_index_is_live_and_no_index_beats_the_exact_top_k(tmp_path):
    out = tmp_path / "fresh.json"
    index_freshness.main(["--classes", "80", "--steps", "12", "--every", "4", "--batch", "16", "--views", "3",
                          "--input-dim", "12", "--dim", "8", "--warmup", "1", "--probe", "10", "--rerank", "2",
                          "--cells", "exact:0.25", "random:0.25", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    exact, uniform = rows
    assert [p["step"] for p in exact["points"]] == [4, 8, 12]
    answered = [p for p in exact["points"] if "recall" in p]
    assert answered, "the exact index was never ready"
    for p in answered:
        assert p["recall"] > 0.5 and p["index_sim"] <= p["exact_sim"] + 1e-5
        assert p["rerank2_sim"] >= p["index_sim"] - 1e-5
    assert all("recall" not in p for p in uniform["points"])  # random keeps no index


def test_the_image_regime_probes_held_out_rendered_views(tmp_path):
    out = tmp_path / "fresh.json"
    index_freshness.main(["--regime", "images", "--classes", "24", "--views", "2", "--image-size", "32",
                          "--render-jobs", "1", "--cache", str(tmp_path / "cache"), "--steps", "4", "--every", "2",
                          "--batch", "8", "--dim", "8", "--warmup", "1", "--probe", "6", "--cells", "exact:0.5",
                          "--workdir", str(tmp_path / "w"), "--out", str(out)])
    points = json.loads(out.read_text())["results"][0]["points"]
    assert [p["step"] for p in points] == [2, 4]
    assert any(p.get("recall", 0) > 0.5 for p in points)
