"""`hfs bench-fc --memory-at` with an index sampler: the trainer builds against a server."""

import pytest

from hfs.bench.fc import trainer_memory
from hfs.config import load_config


@pytest.mark.slow
def test_memory_check_runs_the_configured_index_sampler_against_a_server():
    cfg = load_config(None, ["model.embedding_size=16", "sampler.type=annoy", "sampler.annoy_trees=2"])
    (row,) = trainer_memory(cfg, [300], batch=8, sample_num=40, steps=1)
    assert row["num_classes"] == 300 and row["peak_rss_mb"] >= row["after_imports_mb"] > 0
    assert row["rssanon_mb"] > 0 and row["rssfile_mb"] >= 0  # Linux: the split is reported


@pytest.mark.slow
def test_a_dead_memory_child_is_reported_not_waited_for():
    import multiprocessing as mp

    from hfs.bench.fc import _result_or_death

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_exit_without_result)
    proc.start()
    row = _result_or_death(queue, proc)
    assert row == {"error": "the trainer process died (exit code 3) without a result"}


def _exit_without_result() -> None:
    raise SystemExit(3)
