"""`hfs train` and `hfs train-dist` resolve a run the same way (`hfs.train.run_dir.resolve_run`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hfs.cli import app


@pytest.fixture
def captured(monkeypatch):
    """Both commands stop where the work would start; what they would train with is kept."""
    import hfs.train.launch
    import hfs.train.trainer

    seen: dict[str, tuple] = {}

    def train(cfg, resume=None, **kwargs):
        seen["train"] = (cfg, resume)
        return hfs.train.trainer.TrainResult(0, 0, 0.0, cfg.fc.mode, 0, 0)

    def run_train_dist(cfg, resume=None, **kwargs):
        seen["train-dist"] = (cfg, resume)
        return None

    monkeypatch.setattr(hfs.train.trainer, "train", train)
    monkeypatch.setattr(hfs.train.trainer, "summarize", lambda result, console=None: None)
    monkeypatch.setattr(hfs.train.launch, "run_train_dist", run_train_dist)
    return seen


def _both(seen: dict, *args: str) -> tuple:
    for command in ("train", "train-dist"):
        result = CliRunner().invoke(app, [command, *args])
        assert result.exit_code == 0, result.output
    (cfg_a, resume_a), (cfg_b, resume_b) = seen["train"], seen["train-dist"]
    assert cfg_a.to_dict() == cfg_b.to_dict() and str(resume_a) == str(resume_b)
    return cfg_a, resume_a


def test_the_same_flags_give_the_same_config_and_an_explicit_set_wins(captured, tmp_path):
    cfg, resume = _both(captured, "--sampled", "--sample-num", "8", "--set", "fc.sample_num=4",
                        "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "train.max_steps=3")
    assert resume is None
    assert cfg.fc.mode == "sampled" and cfg.fc.sample_num == 4 and cfg.train.max_steps == 3
    cfg, _ = _both(captured, "--sampled", "--set", "fc.mode=full", "--set", f"train.output_dir={tmp_path / 'run'}")
    assert cfg.fc.mode == "full"


def test_a_resumed_run_gets_the_same_checkpoint_folder_and_config_in_both(captured, tmp_path):
    from hfs.checkpoint import save_checkpoint
    from hfs.config import load_config

    run = tmp_path / "run"
    saved = load_config(None, ["fc.mode=sampled", "fc.sample_num=6", "train.max_steps=4", f"train.output_dir={run}"])
    checkpoint = save_checkpoint(run, 2, {"config": saved.to_dict()}, keep=1)
    cfg, resume = _both(captured, "--resume", str(run), "--sample-num", "5", "--set", "train.max_steps=9")
    assert str(resume) == str(checkpoint)
    assert cfg.train.output_dir == str(run) and cfg.fc.mode == "sampled"  # the checkpoint's own config ...
    assert cfg.fc.sample_num == 5 and cfg.train.max_steps == 9  # ... with the flags and --set on top


def test_a_finished_run_is_reported_by_both_and_nothing_is_trained(captured, tmp_path):
    from hfs.checkpoint import save_checkpoint
    from hfs.config import load_config

    run = tmp_path / "run"
    saved = load_config(None, ["train.max_steps=2", f"train.output_dir={run}"])
    save_checkpoint(run, 2, {"config": saved.to_dict()}, keep=1)
    for command in ("train", "train-dist"):
        result = CliRunner().invoke(app, [command, "--resume", str(run)])
        assert result.exit_code == 0 and "complete" in result.output, result.output
    assert captured == {}
