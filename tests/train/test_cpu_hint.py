"""A long run on CPU says how long it will take and where the CPU-sized config is (issue 15, item 8)."""

from __future__ import annotations

import logging

import torch

from hfs.train import cpu_hint
from hfs.train.trainer import Trainer


def test_slow_cpu_run_warns_with_the_estimate(tiny_cfg, blobs, caplog, monkeypatch):
    monkeypatch.setattr(cpu_hint, "SLOW_RUN_S", 0.0)
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg("train.max_steps=3", "train.device=cpu"), datasets=blobs).run()
    warned = [r.getMessage() for r in caplog.records if "quickstart_cpu.yaml" in r.getMessage()]
    assert len(warned) == 1 and "on CPU" in warned[0] and "for 3 steps" in warned[0], warned


def test_short_cpu_run_does_not_warn(tiny_cfg, blobs, caplog):
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg("train.max_steps=3", "train.device=cpu"), datasets=blobs).run()
    assert not [r for r in caplog.records if "quickstart_cpu.yaml" in r.getMessage()]


def test_message_for_the_default_config_on_cpu():
    text = cpu_hint.slow_cpu_message(torch.device("cpu"), 94.0, 150)
    assert text is not None and "94 s/step" in text and "3 h 55 min" in text
    assert "hfs train --config configs/quickstart_cpu.yaml" in text
    assert cpu_hint.slow_cpu_message(torch.device("cuda"), 94.0, 150) is None
