"""The run folder of `hfs train` / `hfs train-dist`: where a run writes, checked before it starts.

Kept apart from the training loop: these decide *where* a (resumed) run writes and whether
there is anything left to do, from the config and the checkpoint alone, before any model,
dataset or store is built.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from hfs.config import HfsConfig
from hfs.utils.writable import require_writable_dir

log = logging.getLogger(__name__)


def store_snapshot_dir(cfg: HfsConfig) -> tuple[Path, str]:
    """The in-process store's snapshot folder and the config key it comes from."""
    if cfg.paramserver.snapshot_dir:
        return Path(cfg.paramserver.snapshot_dir), "config key 'paramserver.snapshot_dir'"
    return Path(cfg.train.output_dir) / "store", "config key 'train.output_dir'"


def check_train_outputs(cfg: HfsConfig) -> None:
    """Every folder a training run writes into can be written, before the run starts."""
    require_writable_dir(cfg.train.output_dir, "config key 'train.output_dir'")
    if cfg.fc.mode == "sampled" and not cfg.paramserver.address:
        folder, name = store_snapshot_dir(cfg)
        require_writable_dir(folder, name)
    if cfg.sampler.workdir:
        require_writable_dir(cfg.sampler.workdir, "config key 'sampler.workdir'")


def run_folder_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: ``<run>/checkpoints/step-N.pt`` -> ``<run>``; a loose
    checkpoint file -> the folder it is in."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def output_dir_given(config_path: str | Path | None, overrides: Sequence[str]) -> bool:
    """Whether the user named train.output_dir (in --config's file or a --set)."""
    from hfs.config import read_yaml

    if any(text.split("=", 1)[0].strip() == "train.output_dir" for text in overrides):
        return True
    if config_path is None:
        return False
    train = read_yaml(config_path).get("train") or {}
    return isinstance(train, dict) and "output_dir" in train


def place_resumed_run(cfg: HfsConfig, checkpoint: Path, config_path: str | Path | None,
                      overrides: Sequence[str]) -> HfsConfig:
    """A resumed run writes into the folder its checkpoint is in (a copied run stays apart
    from the original), unless train.output_dir was given; either way it says where."""
    if not output_dir_given(config_path, overrides):
        folder = run_folder_of(checkpoint)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(folder)))
    log.info("resuming from %s; writing to %s", checkpoint, cfg.train.output_dir)
    return cfg


def completed_step(checkpoint: Path, cfg: HfsConfig, world_size: int | None = 1) -> int | None:
    """The checkpoint's step when it already is the end of the run ``cfg`` describes, else None.

    With train.max_steps the end is known; with epochs it is the run's recorded step count,
    when the epoch settings and the world size (None: not known yet) are the checkpoint's own.
    """
    from hfs.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, mmap=True)
    step = int(ckpt["step"])
    total = cfg.train.max_steps
    if not total:
        saved = ckpt["config"].get("train", {})
        same = all(saved.get(k) == getattr(cfg.train, k) for k in ("max_steps", "epochs", "batch_size", "grad_accum"))
        if same and world_size is not None and int(ckpt.get("world_size", 1)) == world_size:
            total = int(ckpt.get("total_steps") or 0)
    return step if total and step >= total else None


def report_if_complete(checkpoint: Path, cfg: HfsConfig, world_size: int | None = 1, console=None) -> bool:
    """Say so and return True when the resumed run has nothing left to do (nothing is touched)."""
    step = completed_step(checkpoint, cfg, world_size)
    if step is None:
        return False
    from hfs.utils.log import make_console

    (console or make_console()).print(
        f"run {cfg.train.output_dir} is complete: {checkpoint} is at step {step}, the end of the run; "
        f"nothing to do (raise train.max_steps, e.g. --set train.max_steps={step * 2}, to train further)",
        soft_wrap=True)
    return True


def resume_hint(cfg: HfsConfig, launched: bool) -> str:
    """The command that continues this run from its newest checkpoint, as printed to users."""
    return f"{'hfs train-dist' if launched else 'hfs train'} --resume {cfg.train.output_dir}"


def newest_run(parent: Path) -> Path | None:
    """The run folder under ``parent`` whose newest checkpoint was written last."""
    from hfs.checkpoint import list_checkpoints

    newest: tuple[float, Path] | None = None
    for folder in sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []:
        found = list_checkpoints(folder)
        if found and (newest is None or found[-1].stat().st_mtime > newest[0]):
            newest = (found[-1].stat().st_mtime, folder)
    return newest[1] if newest else None


def resolve_latest(spec: str, cfg: HfsConfig, config_path: str | Path | None, overrides: Sequence[str]) -> str:
    """``--resume latest`` with neither --config nor train.output_dir given, and no checkpoint
    in the default run folder: the newest run beside it (runs/*), said out loud."""
    from hfs.checkpoint import list_checkpoints

    if spec != "latest" or output_dir_given(config_path, overrides) or list_checkpoints(cfg.train.output_dir):
        return spec
    found = newest_run(Path(cfg.train.output_dir).parent)
    if found is None:
        return spec
    log.info("--resume latest: no checkpoint in %s; resuming the newest run, %s "
             "(give a run folder to --resume to pick another)", cfg.train.output_dir, found)
    return str(found)


def resume_config(spec: str, config_given: bool, cfg: HfsConfig, overrides: Sequence[str]) -> tuple[Path, HfsConfig]:
    """The checkpoint to resume and the config to resume with.

    With ``--config`` the given config is used (so e.g. max_steps can be raised); without
    it, the checkpoint's own config plus the overrides.
    """
    from hfs import checkpoint as ckpt_io
    from hfs.config import apply_overrides, config_from_dict

    path = ckpt_io.resolve_checkpoint(spec, cfg.train.output_dir)
    if config_given:
        return path, cfg
    data = ckpt_io.load_checkpoint(path, mmap=True)["config"]  # the Trainer reads the tensors later
    return path, config_from_dict(apply_overrides(data, overrides))


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """What a training command runs: its config and the checkpoint it resumes (None: a fresh run).

    ``complete``: the checkpoint already is the end of the run (said out loud; nothing to do).
    """

    cfg: HfsConfig
    checkpoint: Path | None = None
    complete: bool = False


def resolve_run(config_path: str | Path | None, overrides: Sequence[str], resume: str | None = None, *,
                world_size: int | None = 1) -> ResolvedRun:
    """The one way `hfs train` and `hfs train-dist` turn their arguments into a run.

    The config is the defaults, then ``config_path``, then ``overrides`` in order (a command
    puts its flags first and ``--set`` last, so an explicit ``--set`` wins). With ``resume`` ('latest', a run folder or a
    checkpoint): the checkpoint, its config (without ``--config``: the checkpoint's own plus the
    overrides), written into its own run folder unless train.output_dir was given; a run already
    at its end (``world_size`` None: not known yet) is reported and marked complete. Every
    folder the run writes into is checked before anything is built.
    """
    from hfs.config import load_config

    cfg = load_config(config_path, overrides)
    checkpoint = None
    if resume:
        resume = resolve_latest(resume, cfg, config_path, overrides)
        checkpoint, cfg = resume_config(resume, config_path is not None, cfg, overrides)
        cfg = place_resumed_run(cfg, checkpoint, config_path, overrides)
        if report_if_complete(checkpoint, cfg, world_size=world_size):
            return ResolvedRun(cfg, checkpoint, complete=True)
    check_train_outputs(cfg)
    return ResolvedRun(cfg, checkpoint)


def warn_ignored_keys(cfg: HfsConfig) -> None:
    """Keys that this fc.mode does not use, said once instead of silently ignored."""
    if cfg.paramserver.address and cfg.fc.mode != "sampled":
        log.warning("paramserver.address=%s is not used with fc.mode=%s (the classifier lives in the trainer); "
                    "the parameter server serves fc.mode=sampled (--sampled)", cfg.paramserver.address, cfg.fc.mode)
