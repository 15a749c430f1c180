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
