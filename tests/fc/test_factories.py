"""hfs.fc.factories: the derived plan and the warning an exact scan on a CPU earns."""

import logging

from hfs.config import config_from_dict
from hfs.fc import factories


def _cfg(sampler: str = "exact", dim: int = 128, device: str = "cpu", batch: int = 256):
    return config_from_dict({"model": {"embedding_size": dim}, "train": {"batch_size": batch},
                             "fc": {"mode": "sampled", "sample_num": 1000},
                             "sampler": {"type": sampler, "exact_device": device}})


def test_exact_is_the_default_sampler():
    assert config_from_dict({}).sampler.type == "exact"


def test_exact_on_a_cpu_warns_only_when_the_scan_is_large():
    big, small = 1_000_000, 20_000
    cfg = _cfg()
    warning = factories.exact_scan_warning(cfg, big, factories.plan_classifier(cfg, big, 0))
    assert warning and "1,000,000 classes" in warning and "33G multiply-adds" in warning
    assert "sampler.type=random" in warning and "sampler.exact_device" in warning
    assert factories.exact_scan_warning(cfg, small, factories.plan_classifier(cfg, small, 0)) is None
    annoy = _cfg("annoy")
    assert factories.exact_scan_warning(annoy, big, factories.plan_classifier(annoy, big, 0)) is None
    every_class = factories.plan_classifier(cfg, 1000, 0)  # sample_num covers C: no index at all
    assert factories.exact_scan_warning(cfg, 1000, every_class) is None


def test_attaching_a_large_exact_index_logs_the_warning(caplog):
    class Store:
        specs = []

        def attach_index(self, name, spec):
            self.specs.append((name, spec))

    cfg, store = _cfg(), Store()
    with caplog.at_level(logging.WARNING, logger="hfs.fc.factories"):
        assert factories.attach_sampled_index(cfg, store, 1_000_000, factories.plan_classifier(cfg, 1_000_000, 0))
    assert store.specs and store.specs[0][1].sampler == "exact"
    assert any("multiply-adds per step" in r.message for r in caplog.records)
