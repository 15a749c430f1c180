"""Helpers shared by the eval tests (import as tests.eval.helpers)."""

from __future__ import annotations


def save_untrained_checkpoint(run, image_size: int, step: int):
    """A checkpoint of an untrained `tiny` backbone (16-D embeddings) taking ``image_size`` inputs."""
    import torch

    from hfs.checkpoint import save_checkpoint
    from hfs.config import load_config
    from hfs.models import build_backbone

    cfg = load_config(None, ["model.arch=tiny", "model.embedding_size=16", f"data.image_size={image_size}"])
    torch.manual_seed(0)
    model = build_backbone(cfg.model, cfg.data.image_size)
    return save_checkpoint(run, step, {"config": cfg.to_dict(), "backbone": model.state_dict()}, keep=1)


def invoke_ok(*args):
    """`hfs ARGS` in-process (Typer's runner); the command must succeed."""
    from typer.testing import CliRunner

    from hfs.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result
