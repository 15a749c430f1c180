"""The evidence scripts' core functions on tiny cases (the scripts themselves are benchmarks, not tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import accuracy_vs_cost  # noqa: E402
import cost_vs_scale  # noqa: E402
import run_all_components  # noqa: E402
import scale_10m  # noqa: E402
from evidence_common import run_context, write_results  # noqa: E402


def test_cost_grid_times_full_and_sampled_and_skips_what_does_not_fit():
    rows = cost_vs_scale.run_grid([500, 4000], [16], batch=8, sample_num=40, samplers=["exact", "random", "annoy"],
                                  steps=2, warmup=1, full_max_gb=cost_vs_scale.full_softmax_bytes(1000, 16, 8) / 2**30,
                                  annoy_trees=2, annoy_max_classes=100, interval=100, threads=0,
                                  fresh_process=False)
    small, big = rows
    assert small["full"]["active"] == 500 and len(small["full"]["step_s"]) == 2
    assert small["exact"]["active"] == 40 and small["random"]["active"] == 40
    assert small["exact"]["speedup_vs_full"] == pytest.approx(small["full"]["median_step_s"] / small["exact"]["median_step_s"])
    assert small["exact"]["amortised_build_s"] == pytest.approx(small["exact"]["build_s"] / 100)
    assert "skipped" in big["full"] and "skipped" in small["annoy"] and "skipped" in big["annoy"]
    assert "speedup_vs_full" not in big["random"] and big["random"]["active"] == 40


def test_spread_identities_cover_the_whole_label_range():
    ds = scale_10m.SpreadIdentities(1_000_000, identities=5, images_per_class=2, image_size=16)
    assert ds.class_ids[0] == 0 and ds.class_ids[-1] == 999_999 and len(set(ds.class_ids.tolist())) == 5
    assert len(ds) == 10 and list(ds.labels()[:4]) == [0, 0, ds.class_ids[1], ds.class_ids[1]]
    img, label = ds[3]
    assert tuple(img.shape) == (3, 16, 16) and label == ds.class_ids[1]
    val = scale_10m.SpreadIdentities(1_000_000, 5, 2, 16, split="val", val_stride=2)
    assert len(val) == 3 and val[1][1] == ds.class_ids[2]


def test_parse_cell_and_array_identities(tmp_path):
    assert accuracy_vs_cost.parse_cell("full", 1000) == ("full", 1000)
    assert accuracy_vs_cost.parse_cell("annoy:0.01", 10_000) == ("annoy", 100)
    with pytest.raises(SystemExit):
        accuracy_vs_cost.parse_cell("annoy", 10)
    images = np.load(accuracy_vs_cost.pregenerate(tmp_path, classes=3, views=3, image_size=16, jobs=1), mmap_mode="r")
    assert images.shape == (3, 3, 16, 16, 3) and images.std() > 0
    train = accuracy_vs_cost.ArrayIdentities(images, 2, "train", 16)
    val = accuracy_vs_cost.ArrayIdentities(images, 2, "val", 16)
    assert len(train) == 6 and len(val) == 3 and train[5][1] == 2 and val[2][1] == 2
    strided = accuracy_vs_cost.ArrayIdentities(images, 2, "val", 16, class_stride=2)
    assert len(strided) == 2 and [strided[i][1] for i in range(2)] == [0, 2] and list(strided.labels()) == [0, 2]


def test_accuracy_resume_keeps_earlier_rows_and_their_commands(tmp_path):
    out = tmp_path / "acc.json"
    write_results(out, {**run_context(), "command": "first"}, [{"cell": "full", "seed": 0}])
    rows, earlier = accuracy_vs_cost.previous_run(out)
    assert rows == [{"cell": "full", "seed": 0}] and [c["command"] for c in earlier] == ["first"]
    write_results(out, {**run_context(), "command": "second", "earlier_runs": earlier}, rows + [{"cell": "x"}])
    rows, earlier = accuracy_vs_cost.previous_run(out)
    assert len(rows) == 2 and [c["command"] for c in earlier] == ["first", "second"]
    assert accuracy_vs_cost.previous_run(tmp_path / "none.json") == ([], [])


def test_accuracy_table_takes_medians_over_seeds():
    import evidence_report

    def row(cell, seed, top1, ver, step):
        return {"cell": cell, "seed": seed, "sampler": cell.split(":")[0], "sample_num": 10, "val_top1": top1,
                "verification": {"v.bin": ver}, "median_step_s": step, "train_seconds": 10.0,
                "timers": {"select": 1.0, "observe": 0.5, "refresh": 0.5}, "upkeep_bg_cpu_share": 0.25}

    data = {"context": {**run_context(), "command": "accuracy_vs_cost.py"},
            "results": [row("full", 0, 0.1, 0.8, 0.2), row("full", 1, 0.3, 0.9, 0.4), row("full", 2, 0.2, 0.7, 0.3),
                        row("random:0.1", 0, 0.05, 0.6, 0.1)]}
    table = evidence_report.accuracy_table(data)
    assert "| full | 10 | 3 | 20.00% (10.00-30.00) | 80.00% (70.00-90.00) | 300.0 ms | 1.00x | 10.0% | 10.0% | 25.0% |" in table
    assert "| random:0.1 | 10 | 1 | 5.00% | 60.00% | 100.0 ms | 0.33x |" in table


def test_components_table_and_results_file(tmp_path):
    ps = {"config": {"workers": 2}, "memory": {"rows": 10, "dim": 4, "rss_gib": 0.0}, "inprocess_rt_per_s": 10.0,
          "loopback_rt_per_s": 5.0, "loopback_over_inprocess": 0.5, "sync_1_worker_ms": 1.0,
          "sync_2_workers_ms": 1.5, "sync_ratio": 1.5}
    rows = run_all_components.paramserver_rows(ps)
    table = run_all_components.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| paramserver | loopback / in-process | 0.50 |" in table
    path = write_results(tmp_path / "r.json", run_context(), {"x": 1})
    data = json.loads(path.read_text())
    assert data["results"] == {"x": 1} and "loadavg_end" in data["context"] and data["context"]["command"]


def test_index_build_times_a_small_annoy_forest():
    import index_build

    row = index_build.build_once("annoy", classes=500, dim=8, trees=2, probe_batch=4, k=3)
    assert row["classes"] == 500 and row["build_s"] > 0 and row["query_ms_per_batch"] > 0 and row["trees"] == 2


@pytest.mark.slow
def test_accuracy_script_end_to_end_with_parallel_cells_and_resume(tmp_path):
    out = tmp_path / "acc.json"
    common = ["--classes", "24", "--train-views", "2", "--val-views", "1", "--verify-identities", "8",
              "--verify-pairs", "20", "--image-size", "16", "--dim", "8", "--batch", "8", "--steps", "3",
              "--warmup", "1", "--jobs", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    accuracy_vs_cost.main(common + ["--cells", "full", "random:0.5", "--seeds", "0", "1", "--parallel", "2",
                                    "--val-stride", "2"])
    rows = json.loads(out.read_text())["results"]
    assert [(r["cell"], r["seed"]) for r in rows] == [("full", 0), ("full", 1), ("random:0.5", 0), ("random:0.5", 1)]
    assert all(0 <= r["val_top1"] <= 1 and r["sample_num"] in (24, 12) for r in rows)
    accuracy_vs_cost.main(common + ["--cells", "full", "exact:0.5", "--resume"])
    data = json.loads(out.read_text())
    assert [(r["cell"], r["seed"]) for r in data["results"]] == [("full", 0), ("full", 1), ("exact:0.5", 0),
                                                                 ("random:0.5", 0), ("random:0.5", 1)]
    assert len(data["context"]["earlier_runs"]) == 1


def test_plot_summarises_each_cell_over_seeds_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_accuracy_vs_cost
    from PIL import Image

    rows = [{"cell": "full", "sampler": "full", "sample_num": 10, "val_top1": v, "verification": {"b": v},
             "median_step_s": v} for v in (0.1, 0.3, 0.2)]
    rows += [{"cell": f"{s}:0.5", "sampler": s, "sample_num": 5, "val_top1": 0.4, "verification": {"b": 0.6},
              "median_step_s": 0.01} for s in ("annoy", "hnsw")]
    cells = plot_accuracy_vs_cost.cell_summaries(rows)
    assert [c["cell"] for c in cells] == ["full", "annoy:0.5", "hnsw:0.5"]
    assert cells[0]["val_top1"] == {"median": 0.2, "min": 0.1, "max": 0.3} and cells[0]["seeds"] == 3
    assert cells[0]["step_ms"] == pytest.approx({"median": 200.0, "min": 100.0, "max": 300.0})
    data = {"context": {**run_context(), "args": {"classes": 10, "steps": 3, "batch": 2, "seeds": [0, 1, 2]}},
            "results": rows}
    out = plot_accuracy_vs_cost.plot(data, tmp_path / "p.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 400
    plot_accuracy_vs_cost.main([str(_write_json(tmp_path / "r.json", data)), "--out", str(tmp_path / "q.png")])
    assert (tmp_path / "q.png").stat().st_size > 0


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_accuracy_cells_take_config_overrides(tmp_path):
    args = accuracy_vs_cost.parse_args(["--set", "sampler.hard_after=7", "--set", "optim.momentum=0"])
    cfg = accuracy_vs_cost.cell_config(args, "annoy", 100, tmp_path, tmp_path / "v.bin", seed=3)
    assert (cfg.sampler.hard_after, cfg.optim.momentum, cfg.train.seed, cfg.fc.sample_num) == (7, 0.0, 3, 100)
    assert cfg.sampler.type == "annoy" and cfg.fc.mode == "sampled"


def test_paramserver_counters_cover_every_path_on_a_tiny_matrix():
    import paramserver_counters

    from hfs.bench.paramserver import BenchConfig

    results = paramserver_counters.run(3, 2, ["lazy"], BenchConfig(rows=20, dim=8, num_classes=200))
    paths = results["paths"]
    assert set(paths) == {"inprocess_lazy", "served_lazy", "seed_lazy"}
    assert "server_cpu_ms" not in paths["inprocess_lazy"] and paths["served_lazy"]["server_minflt"] >= 0
    assert all(p["steps"] == 3 and p["rate_per_s"] > 0 and p["client_cpu_ms"] >= 0 for p in paths.values())
    table = paramserver_counters.markdown(results)
    assert table.count("\n") == 1 + len(paths) and "| seed_lazy |" in table
    cpu, faults = paramserver_counters.proc_counters()
    assert cpu > 0 and faults > 0


@pytest.mark.slow
def test_sampled_step_served_times_steps_with_the_servers_index(tmp_path):
    import sampled_step_served

    args = sampled_step_served.parse_args(["--classes", "3000", "--dim", "16", "--batch", "8", "--sample-num", "50",
                                           "--sampler", "exact", "--steps", "3", "--warmup", "1", "--label", "t"])
    result = sampled_step_served.run(args, tmp_path)
    assert result["label"] == "t" and result["median_step_ms"] > 0
    assert result["p10_p90_step_ms"][0] <= result["median_step_ms"] <= result["p10_p90_step_ms"][1]
    assert result["upkeep"]["index_ready"] is True and result["upkeep"]["builds"] >= 1  # the server built it
    assert result["server_rss_mb_max"] > 0 and result["trainer_peak_rss_mb"] > 0


@pytest.mark.slow
def test_scale_run_waits_for_the_servers_index_then_trains_with_it(tmp_path):
    """scale_10m.py --wait-index on a tiny case: the server builds the trainer's index before the
    first step, and every recorded step has it ready."""
    import json

    out = tmp_path / "scale.json"
    scale_10m.main(["--classes", "3000", "--dim", "16", "--identities", "16", "--images", "2", "--val-identities", "4",
                    "--image-size", "16", "--batch", "8", "--sample-num", "64", "--sampler", "exact", "--steps", "50",
                    "--warmup", "2", "--log-every", "25", "--workers", "0", "--wait-index",
                    "--workdir", str(tmp_path / "w"), "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["index_build_wall_s"] > 0 and results["server_rss_with_index_mb"] > 0
    assert results["rss"] and all(r["index_ready"] for r in results["rss"])
    assert results["result"]["steps"] == 50


@pytest.mark.slow
def test_served_ratio_interleaves_rounds_and_takes_ratios_within_each(tmp_path):
    import served_ratio

    out = tmp_path / "ratio.json"
    result = served_ratio.main(["--rounds", "2", "--seconds", "0.05", "--rows", "20", "--dim", "8", "--shards", "2",
                                "--num-classes", "300", "--out", str(out)])
    assert result["shm_used"]
    assert all(len(v) == 2 and min(v) > 0 for v in result["rates"].values())
    per_round = result["per_round_over_inprocess"]["shm_pipelined"]
    assert per_round == [a / b for a, b in zip(result["rates"]["shm_pipelined"], result["rates"]["inprocess"])]
    assert result["over_inprocess"]["shm_pipelined"]["median"] == pytest.approx(sum(per_round) / 2)
    assert json.loads(out.read_text())["results"][0]["rates"] == result["rates"]


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--seconds", "0"], ["--shards", "0"]])
def test_served_ratio_refuses_a_bad_option_before_starting_a_server(bad, tmp_path):
    import served_ratio

    with pytest.raises(SystemExit, match="--rounds and --shards must be >= 1"):
        served_ratio.main([*bad, "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_two_runs_rendering_the_same_image_cache_at_once_both_get_it(tmp_path):
    """Two evidence runs started together render the same cache: each into its own temp file,
    so neither truncates the other's work nor fails to rename (a run died of that)."""
    import threading

    paths, errors = [], []

    def render():
        try:
            paths.append(accuracy_vs_cost.pregenerate(tmp_path, classes=4, views=2, image_size=16, jobs=1))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=render) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    images = np.load(paths[0])
    assert images.shape == (4, 2, 16, 16, 3) and images.std() > 0
    assert not list(tmp_path.glob("*.partial.npy"))
