import json
import os
import signal

import pytest
import torch

from hfs.checkpoint import list_checkpoints
from hfs.eval.hooks import verification_hooks
from hfs.models.loading import load_backbone
from hfs.train.schedule import lr_at
from hfs.train.trainer import Trainer, train
from hfs.config import OptimConfig
from hfs.utils.errors import HfsError


def _first_last_loss(output_dir):
    rows = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    return losses[0], losses[-1], rows


def test_full_run_learns(tiny_cfg, blobs, tmp_path):
    cfg = tiny_cfg()
    result = train(cfg, datasets=blobs)
    first, last, rows = _first_last_loss(tmp_path / "run")
    assert result.steps == 30 and not result.interrupted
    assert last["loss"] < 0.5 * first["loss"]
    assert last["acc"] > first["acc"] and result.val_top1 > 0.8
    assert rows[-1]["val_top1"] == result.val_top1
    model, saved_cfg = load_backbone(tmp_path / "run")
    assert saved_cfg.model.arch == "tiny" and not model.training
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 16)


def _weights(trainer):
    state = {f"backbone.{k}": v.clone() for k, v in trainer.backbone.state_dict().items()}
    state.update({f"fc.{k}": v.clone() for k, v in trainer.fc.state_dict().items()})
    return state


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_cfg, blobs, tmp_path, accum):
    overrides = ("train.max_steps=8", f"train.grad_accum={accum}", "model.dropout=0.2", "train.checkpoint_every=3")
    straight = Trainer(tiny_cfg(*overrides, f"train.output_dir={tmp_path / 'a'}"), datasets=blobs)
    straight.run()

    def stop_at_5(trainer, step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: finish step, checkpoint, return

    cfg_b = tiny_cfg(*overrides, f"train.output_dir={tmp_path / 'b'}")
    first = Trainer(cfg_b, datasets=blobs, callbacks=[stop_at_5]).run()
    assert first.interrupted and first.steps == 5
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "step-00000005.pt"
    resumed = Trainer(cfg_b, datasets=blobs, resume=first.checkpoint)
    assert resumed.run().steps == 8

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_keeps_last_k_checkpoints(tiny_cfg, blobs, tmp_path):
    train(tiny_cfg("train.max_steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2"), datasets=blobs)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000005.pt", "step-00000006.pt"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tiny_cfg, blobs):
    train(tiny_cfg("train.max_steps=2"), datasets=blobs)
    with pytest.raises(HfsError, match="already holds checkpoints.*--resume latest"):
        train(tiny_cfg("train.max_steps=2"), datasets=blobs)


def test_too_few_classes_in_config_is_rejected(tiny_cfg, blobs):
    with pytest.raises(HfsError, match="fc.num_classes.*12 classes"):
        train(tiny_cfg("fc.num_classes=5"), datasets=blobs)


def test_missing_data_root_is_rejected(tiny_cfg, tmp_path):
    with pytest.raises(HfsError, match="data.root"):
        train(tiny_cfg("data.source=list"))
    with pytest.raises(HfsError, match="data.root.*not a folder"):
        train(tiny_cfg("data.source=list", f"data.root={tmp_path / 'nope'}"))


def test_resume_into_other_mode_or_size_is_rejected(tiny_cfg, blobs, tmp_path):
    first = train(tiny_cfg("train.max_steps=2"), datasets=blobs)
    with pytest.raises(HfsError, match="trained with 12 classes, this config has 20"):
        train(tiny_cfg("train.max_steps=4", "fc.num_classes=20"), datasets=blobs, resume=first.checkpoint)
    with pytest.raises(HfsError, match="fc.mode=full run, this config says fc.mode=sampled"):
        train(tiny_cfg("train.max_steps=4", "fc.mode=sampled"), datasets=blobs, resume=first.checkpoint)
    with pytest.raises(HfsError, match="fc.mode.*sharded.*train-dist"):
        train(tiny_cfg("fc.mode=sharded"), datasets=blobs)


def test_schedules():
    o = OptimConfig(lr=1.0, schedule="multistep", milestones=[10, 20], gamma=0.1, warmup_steps=4)
    assert [lr_at(s, o, 30) for s in (0, 3, 9, 10, 25)] == pytest.approx([0.25, 1.0, 1.0, 0.1, 0.01])
    c = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0)
    assert lr_at(0, c, 10) == pytest.approx(1.0) and lr_at(5, c, 10) == pytest.approx(0.5)
    p = OptimConfig(lr=1.0, schedule="poly", power=2.0)
    assert lr_at(5, p, 10) == pytest.approx(0.25)
    assert lr_at(7, OptimConfig(lr=0.3, schedule="constant"), 10) == pytest.approx(0.3)


def test_checkpoint_every_epochs(tiny_cfg, blobs, tmp_path):
    # 192 images / 24 = 8 batches per epoch; accum 3 -> epochs end inside steps 3, 6 (mid-step), 8.
    train(tiny_cfg("train.max_steps=9", "train.grad_accum=3", "train.checkpoint_every_epochs=1",
                   "train.keep_checkpoints=10"), datasets=blobs)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "step-00000003.pt", "step-00000006.pt", "step-00000008.pt", "step-00000009.pt"]


def test_verification_bins_scored_during_and_after_training(tiny_cfg, blobs, tmp_path):
    from hfs.data.bins import write_bin
    from hfs.data.synthetic import synthetic_verification_pairs

    images, issame = synthetic_verification_pairs(20, first_class=100, num_classes=6, image_size=16)
    write_bin(tmp_path / "pairs.bin", images, issame)
    cfg = tiny_cfg("train.max_steps=4", "eval.every=2", "eval.folds=2", f"eval.bins=[{tmp_path / 'pairs.bin'}]")
    result = train(cfg, datasets=blobs, hooks=verification_hooks(cfg))
    assert set(result.verification) == {"pairs"} and 0.0 <= result.verification["pairs"] <= 1.0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "verify_pairs" in r] == [2, 4]


def test_paramserver_address_outside_sampled_mode_is_named(tiny_cfg, blobs, caplog):
    """Issue 15 item 16: a server address that full softmax does not use is not ignored silently."""
    import logging

    with caplog.at_level(logging.WARNING):
        result = train(tiny_cfg("train.max_steps=1", "paramserver.address=tcp://127.0.0.1:9"), datasets=blobs)
    assert result.steps == 1
    assert any("paramserver.address" in r.getMessage() and "fc.mode=full" in r.getMessage() for r in caplog.records)
