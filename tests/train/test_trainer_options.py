"""The trainer with arcface_torch's options: AdamW, gradient clipping, the poly schedule, loggers."""

import json
import os
import signal

import pytest
import torch

from hfs.train.trainer import Trainer, train


def test_adamw_with_clipping_learns_and_the_classifier_is_in_adamw(tiny_cfg, blobs, tmp_path):
    cfg = tiny_cfg("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05", "optim.clip_grad_norm=5",
                   "optim.schedule=poly", "optim.power=1", "optim.warmup_steps=3")
    trainer = Trainer(cfg, datasets=blobs)
    result = trainer.run()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert any(p is trainer.fc.weight for g in trainer.optimizer.param_groups for p in g["params"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"] and result.val_top1 > 0.8


def test_clipping_bounds_every_backbone_step(tiny_cfg, blobs, monkeypatch):
    """Every step's backbone gradient reaches the optimizer with total norm <= clip_grad_norm."""
    seen = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for p in self.param_groups[0]["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    train(tiny_cfg("train.max_steps=5", "optim.clip_grad_norm=0.05", "optim.lr=0.5"), datasets=blobs)
    assert len(seen) == 5 and max(seen) <= 0.05 * (1 + 1e-5)


def test_adamw_interrupted_and_resumed_equals_uninterrupted(tiny_cfg, blobs, tmp_path):
    overrides = ("train.max_steps=6", "optim.name=adamw", "optim.lr=0.01", "optim.clip_grad_norm=1",
                 "train.checkpoint_every=2")
    straight = Trainer(tiny_cfg(*overrides, f"train.output_dir={tmp_path / 'a'}"), datasets=blobs)
    straight.run()

    def stop_at_3(trainer, step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg_b = tiny_cfg(*overrides, f"train.output_dir={tmp_path / 'b'}")
    first = Trainer(cfg_b, datasets=blobs, callbacks=[stop_at_3]).run()
    assert first.interrupted and first.steps == 3
    resumed = Trainer(cfg_b, datasets=blobs, resume=first.checkpoint)
    assert resumed.run().steps == 6
    for a, b in zip(straight.backbone.state_dict().values(), resumed.backbone.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.fc.weight, resumed.fc.weight)


def test_loggers_jsonl_only_writes_no_tensorboard(tiny_cfg, blobs, tmp_path):
    train(tiny_cfg("train.max_steps=2", "train.loggers=[jsonl]"), datasets=blobs)
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_adamw_in_sampled_mode_trains_the_backbone_and_the_store_keeps_sgd(tiny_cfg, blobs, caplog):
    pytest.importorskip("annoy")
    cfg = tiny_cfg("fc.mode=sampled", "fc.sample_num=6", "sampler.type=random", "optim.name=adamw",
                   "optim.lr=0.01", "fc.lr_scale=10", "optim.weight_decay=0.1", "optim.store_weight_decay=0.0005",
                   "train.max_steps=4")
    with caplog.at_level("WARNING"):
        trainer = Trainer(cfg, datasets=blobs)
        trainer.run()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert "keep the store's SGD" in caplog.text


@pytest.mark.gpu
def test_fp16_amp_clips_the_unscaled_gradient_on_cuda(tiny_cfg, blobs, monkeypatch):
    """Under fp16 the clip sees the true gradient (unscaled first) and the scaler's step does not
    unscale again: every finite step reaches AdamW with norm <= clip_grad_norm."""
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for p in self.param_groups[0]["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = train(tiny_cfg("train.device=cuda", "train.amp=fp16", "optim.name=adamw", "optim.lr=0.01",
                            "optim.clip_grad_norm=0.5", "train.max_steps=6"), datasets=blobs)
    assert result.steps == 6 and seen and max(seen) <= 0.5 * (1 + 1e-3)
    assert torch.isfinite(torch.tensor(result.loss))
