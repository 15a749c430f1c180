"""benchmarks/time_to_accuracy.py on a tiny case: curves, TAR, resume, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import plot_time_to_accuracy  # noqa: E402
import time_to_accuracy  # noqa: E402


def test_tar_at_far_counts_genuine_pairs_above_the_impostor_quantile():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16)).astype(np.float32)
    assert time_to_accuracy.tar_at_far(a, a + 1e-3 * rng.standard_normal(a.shape), 1e-3) == 1.0
    assert time_to_accuracy.tar_at_far(a, rng.standard_normal(a.shape), 1e-3) < 0.05
    half = a.copy()
    half[100:] = rng.standard_normal((100, 16))  # half the identities unrecognisable
    assert time_to_accuracy.tar_at_far(a, half, 1e-3) == pytest.approx(0.5, abs=0.03)


def test_converged_needs_a_flat_tail():
    flat = [{"step": s, "val_top1": 0.5 + (0.001 if s == 100 else 0)} for s in (20, 40, 60, 80, 100)]
    rising = [{"step": s, "val_top1": s / 100} for s in (20, 40, 60, 80, 100)]
    assert time_to_accuracy.converged(flat, 100, 0.005)
    assert not time_to_accuracy.converged(rising, 100, 0.005)
    two_steps_apart = [{"step": 98, "val_top1": 0.5}, {"step": 100, "val_top1": 0.5}]
    assert not time_to_accuracy.converged(two_steps_apart, 100, 0.005)
    # evaluations every 1,000 of 8,000 steps: the stretch starts at the one at step 6,000
    late_rise = [{"step": s, "val_top1": 0.9 if s < 7000 else 0.95} for s in range(1000, 8001, 1000)]
    assert not time_to_accuracy.converged(late_rise, 8000, 0.005)
    flat_from_6000 = [{"step": s, "val_top1": 0.9 if s >= 6000 else 0.5} for s in range(1000, 8001, 1000)]
    assert time_to_accuracy.converged(flat_from_6000, 8000, 0.005)


def test_end_to_end_with_resume_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tta.json"
    common = ["--classes", "60", "--steps", "6", "--eval-every", "3", "--batch", "16", "--views", "3",
              "--verify-identities", "40", "--input-dim", "12", "--dim", "8", "--warmup", "1",
              "--workdir", str(tmp_path / "work"), "--out", str(out)]
    time_to_accuracy.main([*common, "--cells", "full", "exact:0.2"])
    rows = json.loads(out.read_text())["results"]
    assert [r["cell"] for r in rows] == ["full", "exact:0.2"]
    for r in rows:
        assert [p["step"] for p in r["curve"]] == [3, 6]
        assert 0.0 <= r["val_top1"] <= 1.0 and 0.0 <= r["tar"] <= 1.0
        assert r["curve"][1]["cpu_s"] >= r["curve"][0]["cpu_s"] > 0
    time_to_accuracy.main([*common, "--cells", "full", "exact:0.2", "random:0.2", "--resume"])
    data = json.loads(out.read_text())
    assert [r["cell"] for r in data["results"]] == ["full", "exact:0.2", "random:0.2"]
    assert data["results"][0]["curve"] == rows[0]["curve"]  # kept, not rerun
    assert len(data["context"]["earlier_runs"]) == 1
    png = plot_time_to_accuracy.plot(out, tmp_path / "tta.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_files_read_as_one(tmp_path):
    def result(cell, seed, top1):
        return {"cell": cell, "seed": seed, "val_top1": top1, "tar": 0.5, "train_cpu_s": 10.0 * (seed + 1),
                "converged": True}

    context = {"args": {"far": 1e-4}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"context": context, "results": [result("full", 0, 0.9), result("random:0.1", 0, 0.8)]}))
    b.write_text(json.dumps({"context": context, "results": [result("full", 1, 0.7), result("full", 2, 0.8)]}))
    text = plot_time_to_accuracy.table(plot_time_to_accuracy.load([a, b]))
    assert "| full | 3 | 80.00 [70.00-90.00] | 50.00 [50.00-50.00] | 20 [10-30] | 3/3 |" in text
    assert "| random:0.1 | 1 | 80.00 |" in text
    with pytest.raises(SystemExit, match="earlier file"):
        plot_time_to_accuracy.load([a, a])


def test_an_interrupted_cell_is_not_recorded(tmp_path, monkeypatch):
    """A signal stops the trainer early: its numbers must not pass for a finished run's (--resume reruns it)."""
    from hfs.train import trainer as trainer_mod

    run = trainer_mod.Trainer.run

    def stopped_early(self):
        result = run(self)
        if self.cfg.fc.mode == "sampled":
            result.interrupted = True
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "run", stopped_early)
    out = tmp_path / "tta.json"
    common = ["--classes", "60", "--steps", "4", "--eval-every", "2", "--batch", "16", "--views", "3",
              "--verify-identities", "40", "--input-dim", "12", "--dim", "8", "--warmup", "1",
              "--workdir", str(tmp_path / "work"), "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        time_to_accuracy.main([*common, "--cells", "full", "random:0.2", "exact:0.2"])
    assert stop.value.code == 130
    assert [r["cell"] for r in json.loads(out.read_text())["results"]] == ["full"]


def test_equal_cpu_budget_calibrates_each_cell_and_scores_a_subset(tmp_path):
    """--budget-cpu-s: each cell's steps come from its own measured cost; --val-samples scores a fixed subset."""
    out = tmp_path / "tta.json"
    time_to_accuracy.main(["--classes", "60", "--batch", "16", "--views", "3", "--verify-identities", "40",
                           "--input-dim", "12", "--dim", "8", "--warmup", "1", "--cells", "full", "random:0.2",
                           "--budget-cpu-s", "0.5", "--calibrate-cpu-s", "0.2", "--evals", "2", "--val-samples", "25",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    for r in rows:
        per_step = r["calibrated_cpu_s_per_step"]
        every = max(1, int(0.5 / per_step) // 2)
        assert per_step > 0 and r["steps"] == 2 * every
        assert [p["step"] for p in r["curve"]] == [every, 2 * every]  # no extra evaluation steps apart
    subset = time_to_accuracy.held_out(list(range(100)), 25, 0)
    assert len(subset) == 25 and list(subset.indices) == sorted(subset.indices)
    assert list(time_to_accuracy.held_out(list(range(100)), 25, 0).indices) == list(subset.indices)
    assert time_to_accuracy.held_out(list(range(10)), 0, 0) == list(range(10))


def test_image_regime_trains_the_cnn_on_rendered_faces(tmp_path):
    """--regime images: the tiny CNN on a rendered cache; verification pairs are unseen identities."""
    out = tmp_path / "tta.json"
    args = ["--regime", "images", "--classes", "24", "--views", "2", "--verify-identities", "12", "--image-size", "32",
            "--dim", "8", "--batch", "8", "--steps", "4", "--eval-every", "2", "--warmup", "1", "--render-jobs", "1",
            "--cache", str(tmp_path / "cache"), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    time_to_accuracy.main([*args, "--cells", "exact:0.5"])
    row = json.loads(out.read_text())["results"][0]
    assert [p["step"] for p in row["curve"]] == [2, 4] and 0.0 <= row["val_top1"] <= 1.0
    parsed = time_to_accuracy.parse_args(args)
    train, val, verify_a, verify_b = time_to_accuracy.regime_data(parsed, 0, parsed.verify_identities)
    assert len(train) == 24 * 2 and len(val) == 24
    assert verify_a.shape == verify_b.shape == (12, 3, 32, 32)
    assert not np.allclose(verify_a.numpy(), verify_b.numpy())  # two different views
    cache = list((tmp_path / "cache").glob("*.npy"))
    assert len(cache) == 1 and np.load(cache[0], mmap_mode="r").shape[:2] == (36, 3)  # C + U identities, views + 1


def test_a_regime_flag_out_of_range_is_named_as_the_flag():
    from hfs.utils.errors import HfsError

    args = time_to_accuracy.parse_args(["--views", "8", "--min-views", "9"])
    with pytest.raises(HfsError, match="--min-views must be in \\[0, 8\\]"):
        time_to_accuracy.label_plan(args)
    plan = time_to_accuracy.label_plan(time_to_accuracy.parse_args(["--classes", "50", "--views", "4",
                                                                     "--label-noise", "0.25"]))
    assert plan.regime.label_noise == 0.25
