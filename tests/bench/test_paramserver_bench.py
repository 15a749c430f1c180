"""`hfs bench-paramserver` on a tiny case: every measurement present, both update rules timed, the seed beside."""

import subprocess
import sys

import pytest

from hfs.bench.paramserver import BenchConfig, render, run_benchmark


@pytest.mark.slow
def test_run_benchmark_times_both_update_rules_in_process(kernel):
    cfg = BenchConfig(rows=20, dim=8, num_classes=500, seconds=0.2, workers=2, sync_steps=3,
                      memory_rows=1000, memory_dim=8, update_rule="lazy", rounds=2, round_seconds=0.05,
                      kernel=kernel, scaling_rows=(10, 100, 1000), bandwidth_mib=4)
    results = run_benchmark(cfg)
    assert results["kernel"]["name"] == kernel and results["kernel"]["warm_up_s"] >= 0
    bandwidth = results["copy_bandwidth"]["bytes_per_s"]
    points = results["rows_per_s"]  # 1000 rows a call is more than the matrix's 500: left out
    assert bandwidth > 0 and [p["rows"] for p in points] == [10, 100]
    for p in points:
        assert p["rows_per_s"] == p["round_trips_per_s"] * p["rows"] > 0
        assert p["of_copy_bandwidth"] == p["bytes_per_s"] / bandwidth == p["rows_per_s"] * 8 * 4 * 8 / bandwidth
    by_rule = results["inprocess_rt_per_s_by_rule"]
    assert set(by_rule) == {"lazy", "catchup"} and all(rate > 0 for rate in by_rule.values())
    assert results["inprocess_rt_per_s"] == by_rule["lazy"]  # the configured rule's rate is the headline
    assert results["loopback_rt_per_s"] > 0 and results["sync_2_workers_ms"] > 0
    assert set(results["loopback_rt_per_s_by_rule"]) == {"lazy", "catchup"}
    assert results["loopback_rt_per_s"] == results["loopback_rt_per_s_by_rule"]["lazy"]
    assert results["seed_rt_per_s"] > 0  # the seed's server logic, side by side in the same run
    assert results["loopback_over_seed"] == results["loopback_rt_per_s"] / results["seed_rt_per_s"]
    assert set(results["loopback_over_seed_by_rule"]) == {"lazy", "catchup"}
    shm = results["loopback_shm_rt_per_s_by_rule"]  # the same traffic through the shared-memory path
    assert results["loopback_shm_used"] and set(shm) == {"lazy", "catchup"} and all(r > 0 for r in shm.values())
    assert results["loopback_shm_over_inprocess"] == shm["lazy"] / by_rule["lazy"]
    assert results["loopback_shm_over_seed"] == shm["lazy"] / results["seed_rt_per_s"]
    assert results["loopback_shm_over_frames_by_rule"]["catchup"] == \
        shm["catchup"] / results["loopback_rt_per_s_by_rule"]["catchup"]
    assert results["loopback_shm_waiting_rt_per_s"] > 0  # pushes waiting for their replies, beside the pipelined
    assert results["loopback_shm_pipelined_over_waiting"] == shm["lazy"] / results["loopback_shm_waiting_rt_per_s"]
    inter = results["interleaved"]  # the served / in-process ratio taken within each of 2 interleaved rounds
    assert inter["shm_used"] and all(len(v) == 2 and min(v) > 0 for v in inter["rates"].values())
    assert inter["kernel"] == inter["server_kernel"] == kernel
    per_round = inter["per_round_over_inprocess"]["shm_pipelined"]
    assert per_round == [a / b for a, b in zip(inter["rates"]["shm_pipelined"], inter["rates"]["inprocess"])]
    # in-process catchup / lazy on the same kernel, round by round ("inprocess" is lazy here, the configured rule)
    catchup = inter["rates"][f"inprocess_catchup_{kernel}"]
    assert inter["per_round_catchup_over_lazy"] == [a / b for a, b in zip(catchup, inter["rates"]["inprocess"])]
    if kernel == "numba":  # and each rule's numba / numpy kernel speed, round by round
        assert set(inter["kernel_over_numpy"]) == {"catchup", "lazy"}
        assert inter["per_round_kernel_over_numpy"]["lazy"] == [
            a / b for a, b in zip(inter["rates"]["inprocess"], inter["rates"]["inprocess_lazy_numpy"])]
    else:
        assert set(inter["paths"]) == {"inprocess", "inprocess_catchup_numpy"} and not inter["kernel_over_numpy"]
    from rich.console import Console

    console = Console(record=True, width=200)
    render(results, console)
    text = console.export_text()
    assert "loopback (lazy) / seed's server" in text and "loopback (catchup) / seed's server" in text
    assert "shared memory / in-process (lazy)" in text and "shared memory / frames (catchup)" in text
    assert "shared memory (lazy) / seed's server" in text
    assert "shared memory: pipelined / waiting pushes" in text
    assert "median [q1-q3] of 2 interleaved rounds" in text
    assert "in-process catchup / lazy, median [q1-q3] of 2 interleaved rounds" in text
    assert "np.copyto of 4 MiB" in text and "100 rows a call" in text
    assert ("numba kernel / numpy kernel" in text) == (kernel == "numba")


@pytest.mark.slow
def test_zero_rounds_skip_the_interleaved_measurement():
    cfg = BenchConfig(rows=10, dim=4, num_classes=100, seconds=0.05, workers=2, sync_steps=2,
                      memory_rows=100, memory_dim=4, rounds=0, scaling_rows=(10,), bandwidth_mib=1)
    results = run_benchmark(cfg)
    assert "interleaved" not in results
    from rich.console import Console

    console = Console(record=True, width=200)
    render(results, console)
    assert "interleaved" not in console.export_text()


def test_bad_update_rule_is_one_error_line():
    proc = subprocess.run([sys.executable, "-m", "hfs", "bench-paramserver", "--update-rule", "sometimes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--update-rule" in proc.stderr and "catchup" in proc.stderr
