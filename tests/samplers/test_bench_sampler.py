import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from hfs.bench.sampler import ExactReference, queries_near, structured_weights
from hfs.cli import app


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["--upkeep-baseline", "--no-upkeep-baseline"])
def test_bench_sampler_end_to_end_writes_json(tmp_path, baseline):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench-sampler", "--num-classes", "3000", "--dim", "16", "--batch-size", "32", "--sample-num", "100",
        "--samplers", "hnsw,exact,random", "--batches", "2", "--upkeep-steps", "20", "--upkeep-samplers", "exact",
        "--json", str(out), "--set", "sampler.refresh=interval", "--set", "sampler.interval=5", baseline])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["sampler"]: r for r in report["query"]}
    k = report["settings"]["k"]
    assert rows["exact"][f"recall_at_{k}"] == 1.0 and rows["random"][f"recall_at_{k}"] is None
    assert rows["exact"]["coverage"] > 3 * rows["random"]["coverage"]
    assert 0 < rows["random"]["coverage"] < 1 and rows["random"]["coverage_vs_random"] == 1.0
    upkeep = report["upkeep"][0]
    assert upkeep["steps"] == 20 and upkeep["rows_updated"] > 0 and upkeep["fg_s"] > 0
    assert ("added_share" in upkeep) == (baseline == "--upkeep-baseline")
    assert "coverage" in result.output


@pytest.mark.slow
def test_weights_file_of_another_float_type(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, structured_weights(400, 8, cluster_size=8).astype(np.float64))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench-sampler", "--weights", str(path), "--batch-size", "16", "--sample-num",
                                      "50", "--samplers", "exact,random", "--batches", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["num_classes"] == 400 and report["settings"]["weights"] == str(path)


def test_coverage_is_the_share_of_negative_softmax_mass():
    weights = structured_weights(500, 8, cluster_size=10, seed=3)
    rng = np.random.default_rng(0)
    labels = np.array([4, 9])
    feats = queries_near(weights[labels], 0.5, rng)
    ref = ExactReference(weights, feats, labels, 5, 10.0, "cosine")
    everything = np.arange(500)
    assert np.isclose(ref.coverage(weights, everything), 1.0)
    logits = 10.0 * feats @ weights.T
    half = everything[::2]
    expected = []
    for i, y in enumerate(labels):
        neg = np.exp(logits[i]) * (everything != y)
        expected.append(neg[half].sum() / neg.sum())
    assert np.isclose(ref.coverage(weights, half), np.mean(expected))
    np.testing.assert_array_equal(ref.topk, np.argsort(-logits, axis=1)[:, :5])


def test_bad_weights_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "w.npy"
    bad.write_bytes(b"not numpy")
    proc = subprocess.run([sys.executable, "-m", "hfs", "bench-sampler", "--weights", str(bad), "--samplers", "random"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --weights {bad}: not a readable .npy")


def test_unknown_sampler_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "hfs", "bench-sampler", "--num-classes", "100", "--dim", "4",
                           "--samplers", "anoy"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --samplers: unknown sampler 'anoy' (did you mean 'annoy'?); known: annoy, exact, hnsw, ivf, random"


@pytest.mark.slow
def test_query_sweep_measures_one_built_index_at_each_value(tmp_path):
    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(app, [
        "bench-sampler", "--num-classes", "3000", "--dim", "16", "--batch-size", "32", "--sample-num", "100",
        "--samplers", "hnsw,random", "--batches", "2", "--query-sweep", "sampler.hnsw_ef=10,200",
        "--query-sweep", "annoy_search_k=50", "--set", "sampler.hnsw_ef_construction=20", "--set", "sampler.hnsw_m=4",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {(r["sampler"], r["setting"]): r for r in report["query"]}
    configured, low, high = ("hnsw", "as configured"), ("hnsw", "hnsw_ef=10"), ("hnsw", "hnsw_ef=200")
    assert list(rows) == [configured, low, high, ("random", "as configured")]  # annoy's knob: no annoy row
    k = report["settings"]["k"]
    assert rows[configured]["build_s"] == rows[low]["build_s"] == rows[high]["build_s"]
    # a weak graph (M 4, ef_construction 20) searched wider finds more of the true neighbours
    assert rows[high][f"recall_at_{k}"] > rows[low][f"recall_at_{k}"]
    assert rows[high]["coverage_vs_random"] > 1
    assert "query setting" in result.output and "hnsw_ef=200" in result.output


@pytest.mark.parametrize("sweep, message", [
    ("hnsw_m=4,8", "KEY one of annoy_search_k, exact_chunk, hnsw_ef, ivf_nprobe, query_threads"),
    ("hnsw_ef", "expected KEY=V1,V2"),
    ("hnsw_ef=a", "values must be integers"),
    ("hnsw_ef=", "no values given"),
])
def test_bad_query_sweep_is_a_one_line_error(sweep, message):
    proc = subprocess.run([sys.executable, "-m", "hfs", "bench-sampler", "--num-classes", "100", "--dim", "4",
                           "--samplers", "random", "--query-sweep", sweep], capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --query-sweep '{sweep}'") and message in last


def test_the_simulated_margin_is_the_heads_own_with_arcfaces_fallback():
    """bench-sampler's training simulation uses the HEADS registry's margin, not a numpy copy of it."""
    from hfs.bench.sampler import head_margin
    from hfs.config import load_config

    cos = np.linspace(-0.99, 0.99, 41).astype(np.float32)
    arc = head_margin(load_config(None, ["head.type=arcface", "head.margin=0.5"]).head)(cos)
    assert arc.dtype == np.float32 and np.all(np.diff(arc) > 0)  # past pi - m the fallback keeps it monotonic
    np.testing.assert_allclose(arc[cos > np.cos(np.pi - 0.5)],
                               np.cos(np.arccos(cos[cos > np.cos(np.pi - 0.5)]) + 0.5), atol=1e-5)
    np.testing.assert_allclose(head_margin(load_config(None, ["head.type=cosface", "head.margin=0.35"]).head)(cos),
                               cos - 0.35, atol=1e-6)
    np.testing.assert_array_equal(head_margin(load_config(None, ["head.type=softmax"]).head)(cos), cos)
