"""A long run on CPU says how long it will take and where the CPU-sized config is (issue 15, item 8)."""

from __future__ import annotations

import logging

import torch

from hfs.train import cpu_hint
from hfs.train.trainer import Trainer


def hints(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "training on CPU at" in r.getMessage()]


def test_slow_cpu_run_warns_before_its_first_step(tiny_cfg, blobs, caplog, monkeypatch):
    monkeypatch.setattr(cpu_hint, "SLOW_RUN_S", 0.0)
    seen_at_step_1 = []
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg("train.max_steps=3", "train.device=cpu"), datasets=blobs,
                callbacks=[lambda t, step, rec: step == 1 and seen_at_step_1.extend(hints(caplog))]).run()
    assert len(hints(caplog)) == 1 and seen_at_step_1 == hints(caplog)  # said once, before step 1 ended
    assert "on CPU" in seen_at_step_1[0] and "for 3 steps" in seen_at_step_1[0]
    assert "estimated from a forward pass" in seen_at_step_1[0]


def test_short_cpu_run_does_not_warn(tiny_cfg, blobs, caplog):
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg("train.max_steps=3", "train.device=cpu"), datasets=blobs).run()
    assert not hints(caplog)


def test_estimate_leaves_the_rng_and_the_mode_alone():
    from hfs.config import ModelConfig
    from hfs.models import build_backbone

    net = build_backbone(ModelConfig(arch="tiny", embedding_size=8), 16)
    net.train()
    before = torch.get_rng_state()
    assert cpu_hint.estimate_step_seconds(net, 16, 64) > 0
    assert torch.equal(before, torch.get_rng_state()) and net.training


def test_message_for_the_default_config_on_cpu():
    text = cpu_hint.slow_cpu_message(torch.device("cpu"), 94.0, 150)
    assert text is not None and "94 s/step" in text and "3 h 55 min" in text
    assert "hfs train --config configs/quickstart_cpu.yaml" in text
    assert cpu_hint.slow_cpu_message(torch.device("cuda"), 94.0, 150) is None


def test_a_user_already_on_a_small_backbone_is_not_sent_to_the_quick_config():
    text = cpu_hint.slow_cpu_message(torch.device("cpu"), 2.0, 6000, arch="tiny")
    assert text is not None and "3 h 20 min" in text
    assert "quickstart_cpu" not in text and "already a small one" in text and "train.max_steps" in text
    assert "quickstart_cpu" in cpu_hint.slow_cpu_message(torch.device("cpu"), 2.0, 6000, arch="iresnet50")


def test_a_backbone_that_takes_no_images_gets_the_after_first_step_measure(caplog):
    """The forward-pass estimate is best effort: a vector backbone (mlp) skips it, nothing fails."""
    from torch import nn

    hint = cpu_hint.CpuHint(torch.device("cpu"), 10)
    hint.before_first_step(nn.Linear(4, 2), 16, 8)  # images do not fit a Linear(4, 2)
    assert not hint.said
