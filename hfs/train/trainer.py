"""The training loop of `hfs train` and of every `hfs train-dist` worker.

`hfs train` runs it in one process with FullFC or SampledFC. Under `hfs train-dist` each
worker runs the same loop with a :class:`~hfs.dist.DistEnv`: the backbone is
wrapped in DistributedDataParallel, each rank takes its slice of every global batch, the
classifier is FullFC (gradients averaged like DDP's), SampledFC on a shared parameter
server (row gradients divided by W: the store sums the W ranks' pushes) or ShardedFC
(model-parallel rows), and rank 0 alone logs, writes metrics and checkpoints. Checkpoints
do not depend on the world size (see `save`).

One optimizer step consumes ``train.grad_accum`` micro-batches of ``train.batch_size``
images. Each micro-batch's loss is divided by ``grad_accum`` before backward, so the
accumulated gradient is the mean over the whole effective batch; the backbone's SGD and the
weight store each take exactly one step per cycle (see `hfs.fc.sampled` for how the row
gradients of a cycle are combined). The lr is a pure function of the step
(`hfs.train.schedule`), pushed to the store each step for the classifier rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from hfs import checkpoint as ckpt_io
from hfs.config import HfsConfig
from hfs.dist import DistEnv, all_reduce_sum, eval_indices
from hfs.fc.layer import ClassifierContext, ClassifierLayer, build_classifier, check_mode_runs_here
from hfs.models import build_backbone, build_head
from hfs.train.data_order import BatchStream, DataPosition
from hfs.train.hooks import StepCallback, default_hooks, gather_record
from hfs.train.optim import build_optimizer, clip_backbone_grads, store_sgd_hparams
from hfs.train.run_dir import resume_hint, warn_ignored_keys
from hfs.train.schedule import lr_at
from hfs.train.setup import (build_datasets_for, check_batch_fits, check_resume,
                             rescale_position, resolve_num_classes, seed_everything, total_steps)
from hfs.utils.device import resolve_device
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    """What a run did; `hfs train` and the demo print it."""

    steps: int
    start_step: int
    seconds: float
    mode: str
    num_classes: int
    active_classes: int
    loss: float = math.nan
    train_acc: float = math.nan
    val_top1: float | None = None
    verification: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    interrupted: bool = False



class Trainer:
    """Builds everything from the config, then `run()`s; `request_stop()` ends it cleanly.

    ``hooks`` measure after each step beside validation, their measures in the step's record
    (see :mod:`hfs.train.hooks`; `hfs train` adds verification this way), ``callbacks`` are
    plain ``fn(trainer, step, record)`` called last with the finished record.
    """

    def __init__(self, cfg: HfsConfig, *, resume: str | Path | None = None, datasets=None,
                 callbacks: Sequence[StepCallback] = (), hooks: Sequence[Any] = (), console=None,
                 env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.launched = env is not None  # a worker of `hfs train-dist` (possibly a job of one)
        self.env = env or DistEnv()
        self.resume_path = Path(resume) if resume is not None else None
        self._datasets = datasets
        self.callbacks = list(callbacks)
        self.extra_hooks = list(hooks)
        self.console = console
        self._stop = threading.Event()
        self._stop_reason = ""
        self._running_step = 0

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "stop requested") -> None:
        """Finish the current step, write a checkpoint and return (what SIGINT/SIGTERM do)."""
        self._stop_reason = reason
        self._stop.set()

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """First Ctrl-C: stop after this step with a checkpoint; second: at once (hfs.train.interrupt)."""
        from hfs.train.interrupt import two_stage_stop

        with two_stage_stop(self.request_stop, self._stop.is_set, lambda: max(self.step, self._running_step),
                            self.cfg.train.output_dir, command="hfs train-dist" if self.launched else "hfs train",
                            announce=self.env.is_main, hard_stop=not self.launched):
            yield

    # ------------------------------------------------------------------ building
    def _setup(self, stack: ExitStack) -> None:
        cfg = self.cfg
        check_mode_runs_here(cfg.fc.mode, self.launched)
        if self.env.is_main:
            warn_ignored_keys(cfg)
        self.device = self.env.device() if self.launched else resolve_device(cfg.train.device, "config key 'train.device'")
        self.amp_dtype = self._resolve_amp()
        seed_everything(cfg.train.seed)
        self.train_ds, self.val_ds, data_classes = self._datasets or build_datasets_for(cfg)
        self.num_classes = resolve_num_classes(cfg.fc.num_classes, data_classes)
        check_batch_fits(len(self.train_ds), cfg.train.batch_size, self.env.world_size)
        self.ckpt = ckpt_io.load_checkpoint(self.resume_path) if self.resume_path else None
        check_resume(self.ckpt, self.resume_path, cfg, self.num_classes)

        self.backbone = build_backbone(cfg.model, cfg.data.image_size).to(self.device)
        self.model = self._data_parallel(self.backbone)
        self.fc: ClassifierLayer = build_classifier(cfg, ClassifierContext(
            num_classes=self.num_classes, head=build_head(cfg.head), device=self.device, env=self.env, stack=stack,
            checkpoint=self.ckpt, checkpoint_path=self.resume_path, resume_hint=resume_hint(cfg, self.launched)))
        params = [{"params": list(self.backbone.parameters()), "lr_scale": 1.0}, *self.fc.param_groups()]
        self.optimizer = build_optimizer(cfg, params)
        self.fc.attach_optimizer(self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.total_steps = total_steps(cfg.train, len(self.train_ds), self.env.world_size)
        self.step = 0
        position = self._load_state(self.ckpt) if self.ckpt is not None else DataPosition()
        self.stream = BatchStream(self.train_ds, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers,
                                  position, pin_memory=self.device.type == "cuda",
                                  rank=self.env.rank, world_size=self.env.world_size)
        stack.callback(self.stream.close)

    def _resolve_amp(self) -> torch.dtype | None:
        amp = self.cfg.train.amp
        if amp == "none":
            return None
        if self.device.type != "cuda":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, self.device)
            return None
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _data_parallel(self, backbone: nn.Module) -> nn.Module:
        """DDP around the backbone on several ranks (the classifier stays outside: FullFC's
        gradient is averaged explicitly, ShardedFC's rows are per rank)."""
        if not self.env.distributed:
            return backbone
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(backbone, device_ids=ids)

    def _load_state(self, ckpt: dict) -> DataPosition:
        """Backbone, optimizer, scaler and RNG from ``ckpt`` (the classifier's factory restored its rows)."""
        from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

        backbone_state = dict(ckpt["backbone"])
        consume_prefix_in_state_dict_if_present(backbone_state, "module.")  # saved from a DDP wrapper
        try:
            self.backbone.load_state_dict(backbone_state)
            optimizer_state = self.fc.optimizer_state(ckpt["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise HfsError(f"checkpoint {self.resume_path} does not fit model.arch={self.cfg.model.arch} "
                           f"embedding_size={self.cfg.model.embedding_size}: {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        ckpt_io.restore_rng(ckpt["rng"])
        self.step = int(ckpt["step"])
        log.info("resumed from %s at step %d", self.resume_path, self.step)
        return rescale_position(DataPosition(**ckpt["data"]), ckpt, self.env.world_size * self.cfg.train.batch_size)

    # ------------------------------------------------------------------ one step
    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        _, momentum, weight_decay = store_sgd_hparams(self.cfg, lr)  # SGD's, whatever optim.name is
        self.fc.before_step(lr, momentum, weight_decay)
        return lr

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns loss/accuracy/images."""
        accum = self.cfg.train.grad_accum
        self._running_step = step + 1  # what a Ctrl-C now stops after
        loss_sum, correct, seen = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0
        push_scale = self.fc.grad_scale(float(self.scaler.get_scale()) if self.scaler is not None else 1.0)
        for micro in range(accum):
            images, labels = self.stream.next()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            last = micro == accum - 1
            with self._grad_sync(last):
                with self._autocast():
                    features = self.model(images)
                out = self.fc(features, labels, step, last_micro=last, grad_scale=push_scale)
                loss = out.loss / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += out.loss.detach().float()  # summed on the device: one host sync per step, not two per micro-batch
            correct += out.correct.detach()
            seen += labels.shape[0]
        self.fc.after_backward()
        self._optimizer_step()
        self.fc.end_step(step)
        loss_total, correct_total = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
        return {"loss": loss_total / accum, "correct": int(round(correct_total)), "images": seen}

    def _optimizer_step(self) -> None:
        clip_backbone_grads(self.backbone.parameters(), self.cfg.optim.clip_grad_norm, self.optimizer, self.scaler)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_sync(self, last_micro: bool):
        """DDP all-reduces the backbone's gradients once per cycle, on the last micro-batch."""
        if self.env.distributed and not last_micro:
            return self.model.no_sync()
        return nullcontext()

    def _agreed_stop(self) -> bool:
        """Stop when any rank was asked to (SIGTERM reaches ranks at different steps; all
        must leave the loop at the same step or their collectives would hang)."""
        if not self.env.distributed:
            return self._stop.is_set()
        return all_reduce_sum([float(self._stop.is_set())], self.device)[0] > 0

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _features(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=self.cfg.eval.batch_size, shuffle=False,
                            num_workers=self.cfg.data.num_workers)
        feats, labels = [], []
        for images, y in loader:
            with self._autocast():
                feats.append(self.backbone(images.to(self.device)).float())
            labels.append(y.to(self.device))
        return torch.cat(feats), torch.cat(labels)

    def validate(self) -> float | None:
        """Top-1 over ALL classes on the validation set (the classifier scans its rows in chunks).

        With W ranks each scores its share (:func:`eval_indices`) and the hits are summed.
        """
        if self.val_ds is None or len(self.val_ds) == 0:
            return None
        from torch.utils.data import Subset

        indices, valid = eval_indices(len(self.val_ds), self.env)
        dataset = Subset(self.val_ds, indices) if self.env.distributed else self.val_ds
        self.backbone.eval()
        try:
            feats, labels = self._features(dataset)
            pred = self.fc.predict(feats)
        finally:
            self.backbone.train()
        hits, count = all_reduce_sum([(pred[:valid] == labels[:valid]).sum().item(), valid], self.device)
        return float(hits / count)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write the checkpoint of this step (rank 0 writes; every rank must call).

        World-size independent: the backbone without DDP's ``module.`` prefix, the
        classifier's own entries (:meth:`ClassifierLayer.checkpoint_state`: rows and momentum
        whole, or the name of the store's snapshot), and the world size so a resume on
        another one can rescale the data position.
        """
        fc_entries = self.fc.checkpoint_state(self.optimizer)
        if not self.env.is_main:
            return ckpt_io.checkpoint_path(self.cfg.train.output_dir, self.step)
        payload: dict[str, Any] = {
            "config": self.cfg.to_dict(), "fc_mode": self.cfg.fc.mode, "num_classes": self.num_classes,
            "world_size": self.env.world_size,
            "backbone": self.backbone.state_dict(),
            "fc": fc_entries["fc"],
            "optimizer": fc_entries["optimizer"],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt_io.capture_rng(),
            "data": dataclasses.asdict(self.stream.position),
            "store_snapshot": fc_entries["store_snapshot"],
            "total_steps": self.total_steps,  # lets a resume of a finished run say so without building anything
        }
        path = ckpt_io.save_checkpoint(self.cfg.train.output_dir, self.step, payload, self.cfg.train.keep_checkpoints)
        log.debug("checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        t_start = time.perf_counter()
        with ExitStack() as stack:
            self._setup(stack)
            hooks = default_hooks(self, stack, self.extra_hooks, self.callbacks)
            stack.enter_context(self._stop_on_signals())
            self.backbone.train()
            self.result = TrainResult(steps=self.step, start_step=self.step, seconds=0.0, mode=self.cfg.fc.mode,
                                      num_classes=self.num_classes, active_classes=self.fc.active_classes)
            for hook in hooks:
                hook.on_start(self)
            self.result.interrupted = self._loop(hooks)
            record = gather_record({"step": self.step}, hooks, [hook.on_end(self) for hook in hooks])
            self._publish(hooks, record, final=True)
            if self.result.interrupted and self.env.is_main:
                command = "hfs train-dist" if self.launched else "hfs train"
                log.warning("%s: stopped after step %d; continue with `%s --resume %s`",
                            self._stop_reason or "a peer rank stopped", self.step, command, self.result.checkpoint)
            self.result.steps = self.step
        self.result.seconds = time.perf_counter() - t_start
        return self.result

    def _loop(self, hooks: Sequence[Any]) -> bool:
        """Steps until total_steps; True when a stop request ended it early."""
        while self.step < self.total_steps:
            if self._agreed_stop():
                return True
            lr = self._set_lr(self.step)
            stats = self.train_step(self.step)
            self.step += 1
            record = gather_record({"step": self.step, "lr": lr}, hooks,
                                   [hook.on_step_end(self, stats) for hook in hooks])
            self._publish(hooks, record, final=False)
        return False

    def _publish(self, hooks: Sequence[Any], record: dict[str, Any], final: bool) -> None:
        """Every hook reads the finished record (read-only: hooks hand data on only by returning it)."""
        view = MappingProxyType(record)
        for hook in hooks:
            hook.on_record(self, view, final)


def train(cfg: HfsConfig, resume: str | Path | None = None, **kwargs) -> TrainResult:
    """Train as configured (resuming from a checkpoint path when given)."""
    return Trainer(cfg, resume=resume, **kwargs).run()


def summarize(result: TrainResult, console=None) -> None:
    """A short rich table of what the run did (the end of `hfs train` and `make demo`)."""
    from rich.table import Table

    from hfs.utils.log import make_console

    table = Table(title="training" + (" (interrupted)" if result.interrupted else ""), show_header=False)
    table.add_row("mode", f"{result.mode}: {result.active_classes} of {result.num_classes} classes per step")
    table.add_row("steps", f"{result.start_step} -> {result.steps} in {result.seconds:.1f} s")
    table.add_row("last loss / train acc", "no step completed" if math.isnan(result.loss)
                  else f"{result.loss:.4f} / {result.train_acc:.1%}")
    if result.val_top1 is not None:
        table.add_row("val top-1 (all classes)", f"{result.val_top1:.2%}")
    for name, acc in result.verification.items():
        table.add_row(f"verification {name}", f"{acc:.2%}")
    table.add_row("checkpoint", result.checkpoint)
    (console or make_console()).print(table)
