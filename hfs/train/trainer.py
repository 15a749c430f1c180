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
import random
import signal
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from hfs.config import HfsConfig
from hfs.fc import FullFC, SampledFC, predict_all_classes
from hfs.fc.sharded import ShardedFC
from hfs.models import build_backbone, build_head
from hfs import checkpoint as ckpt_io
from hfs.train.data_order import BatchStream, DataPosition
from hfs.dist import DistEnv, all_reduce_sum, barrier, eval_indices
from hfs.train.metrics import MetricsWriter
from hfs.train.optim import RowSparseSGD
from hfs.train.schedule import lr_at
from hfs.utils.device import resolve_device
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

MATRIX = "fc"
StepCallback = Callable[["Trainer", int, dict], None]


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



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_num_classes(configured: int, in_data: int) -> int:
    """fc.num_classes, or the data's class count when 0; too few classes is an error."""
    if configured == 0:
        return in_data
    if configured < in_data:
        raise HfsError(f"config key 'fc.num_classes' is {configured} but the training data has "
                       f"{in_data} classes (labels 0..{in_data - 1}); set it to >= {in_data} or 0")
    return configured


def build_datasets_for(cfg: HfsConfig):
    """(train, val or None, num_classes) from `hfs.data.datasets` (which checks data.root)."""
    from hfs.data.datasets import build_datasets

    return build_datasets(cfg)


def resume_config(spec: str, config_given: bool, cfg: HfsConfig, overrides: Sequence[str]) -> tuple[Path, HfsConfig]:
    """The checkpoint to resume and the config to resume with.

    With ``--config`` the given config is used (so e.g. max_steps can be raised); without
    it, the checkpoint's own config plus the ``--set`` overrides.
    """
    from hfs.config import _merge, config_from_dict, parse_override

    path = ckpt_io.resolve_checkpoint(spec, cfg.train.output_dir)
    if config_given:
        return path, cfg
    data = ckpt_io.load_checkpoint(path, mmap=True)["config"]  # the Trainer reads the tensors later
    for text in overrides:
        data = _merge(data, parse_override(text))
    return path, config_from_dict(data)


class Trainer:
    """Builds everything from the config, then `run()`s; `request_stop()` ends it cleanly."""

    def __init__(self, cfg: HfsConfig, *, resume: str | Path | None = None, datasets=None,
                 callbacks: Sequence[StepCallback] = (), console=None, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.launched = env is not None  # a worker of `hfs train-dist` (possibly a job of one)
        self.env = env or DistEnv()
        self.resume_path = Path(resume) if resume is not None else None
        self._datasets = datasets
        self.callbacks = list(callbacks)
        self.console = console
        self._stop = threading.Event()
        self._stop_reason = ""
        self._verification_sets = None

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "stop requested") -> None:
        """Finish the current step, write a checkpoint and return (what SIGINT/SIGTERM do)."""
        self._stop_reason = reason
        self._stop.set()

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            if self._stop.is_set():
                if self.launched:
                    # Ctrl-C reaches a worker twice: from the terminal and forwarded by the
                    # launcher, whose shutdown timeout is the hard stop; keep checkpointing.
                    return
                raise KeyboardInterrupt  # a second signal: give up at once
            self.request_stop(signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ building
    def _setup(self, stack: ExitStack) -> None:
        cfg = self.cfg
        if cfg.fc.mode == "sharded" and not self.launched:
            raise HfsError("config key 'fc.mode' is 'sharded': that is the model-parallel FC of "
                           "`hfs train-dist`; `hfs train` takes full or sampled")
        self.device = self.env.device() if self.launched else resolve_device(cfg.train.device, "config key 'train.device'")
        self.amp_dtype = self._resolve_amp()
        seed_everything(cfg.train.seed)
        train_ds, self.val_ds, data_classes = self._datasets or build_datasets_for(cfg)
        self.train_ds = train_ds
        self.num_classes = resolve_num_classes(cfg.fc.num_classes, data_classes)
        world = self.env.world_size
        if len(train_ds) < cfg.train.batch_size * world:
            raise HfsError(f"the training set has {len(train_ds)} images, fewer than "
                           f"train.batch_size={cfg.train.batch_size}" + (f" x {world} ranks" if world > 1 else ""))
        self.ckpt = ckpt_io.load_checkpoint(self.resume_path) if self.resume_path else None
        if self.ckpt is None and ckpt_io.list_checkpoints(cfg.train.output_dir):
            raise HfsError(f"train.output_dir {cfg.train.output_dir} already holds checkpoints of another run; "
                           "continue it with --resume latest or choose another train.output_dir")
        if self.ckpt is not None and self.ckpt.get("fc_mode") != cfg.fc.mode:
            raise HfsError(f"checkpoint {self.resume_path} is a fc.mode={self.ckpt.get('fc_mode')} run, "
                           f"this config says fc.mode={cfg.fc.mode}")
        if self.ckpt is not None and self.ckpt.get("num_classes") != self.num_classes:
            raise HfsError(f"checkpoint {self.resume_path} was trained with {self.ckpt.get('num_classes')} "
                           f"classes, this config has {self.num_classes}")

        self.backbone = build_backbone(cfg.model, cfg.data.image_size).to(self.device)
        self.model = self._data_parallel(self.backbone)
        self.head = build_head(cfg.head)
        self.mode = cfg.fc.mode
        params = [{"params": list(self.backbone.parameters()), "lr_scale": 1.0}]
        if self.mode == "full":
            self.fc = FullFC(self.num_classes, cfg.model.embedding_size, self.head, init=cfg.fc.init,
                             init_std=cfg.fc.init_std, seed=cfg.train.seed).to(self.device)
            params.append({"params": [self.fc.weight], "lr_scale": cfg.fc.lr_scale})
        elif self.mode == "sharded":
            self.fc = self._build_sharded_fc()
            params.append({"params": [self.fc.weight], "lr_scale": cfg.fc.lr_scale})
        else:
            self.fc = self._build_sampled_fc(stack)
        self.optimizer = RowSparseSGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                      weight_decay=cfg.optim.weight_decay)
        if self.mode == "sharded" and cfg.fc.sharded_momentum == "lazy":
            self.optimizer.update_rows_of(self.fc.weight, self.fc.take_active_rows)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        batches_per_epoch = len(train_ds) // (cfg.train.batch_size * world)
        self.total_steps = cfg.train.max_steps or max(cfg.train.epochs * batches_per_epoch // cfg.train.grad_accum, 1)
        self.step = 0
        position = DataPosition()
        if self.ckpt is not None:
            position = self._load_state(self.ckpt)
        if self.mode == "sharded":
            self._attach_shard_selector(stack)  # after a resume: the index is built from the loaded rows
        self.stream = BatchStream(train_ds, cfg.train.batch_size, cfg.train.seed, cfg.data.num_workers,
                                  position, pin_memory=self.device.type == "cuda",
                                  rank=self.env.rank, world_size=world)
        stack.callback(self.stream.close)

    def _resolve_amp(self) -> torch.dtype | None:
        amp = self.cfg.train.amp
        if amp == "none":
            return None
        if self.device.type != "cuda":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, self.device)
            return None
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _build_sampled_fc(self, stack: ExitStack) -> SampledFC:
        from hfs.paramserver import open_store
        from hfs.samplers import build_selector

        cfg = self.cfg
        sample_num = cfg.fc.sample_num
        if sample_num > self.num_classes:
            log.warning("fc.sample_num=%d is more than the %d classes: every class is active each step",
                        sample_num, self.num_classes)
            sample_num = self.num_classes
        self.sample_num = sample_num
        snapshot_dir = cfg.paramserver.snapshot_dir or str(Path(cfg.train.output_dir) / "store")
        env = self.env
        if env.distributed and not cfg.paramserver.address:
            raise HfsError("fc.mode=sampled on several ranks needs one shared store: set paramserver.address "
                           "(`hfs train-dist` starts a server itself when it is empty)")
        if cfg.paramserver.keep_snapshots < cfg.train.keep_checkpoints:
            log.warning("paramserver.keep_snapshots=%d < train.keep_checkpoints=%d: the oldest checkpoints "
                        "will name store snapshots that no longer exist", cfg.paramserver.keep_snapshots,
                        cfg.train.keep_checkpoints)
        store = open_store(cfg.paramserver, snapshot_dir)
        stack.callback(store.close)
        if env.is_main:  # one rank creates / restores the shared matrix, the others wait for it
            store.create(MATRIX, self.num_classes, cfg.model.embedding_size, init=cfg.fc.init,
                         std=cfg.fc.init_std, seed=cfg.train.seed, exist_ok=True)
            if self.ckpt is not None:
                self._restore_store(store, self.ckpt)
            elif (trained_to := store.last_applied(MATRIX)) >= 0:
                raise HfsError(
                    f"the parameter server at {cfg.paramserver.address} already holds a matrix '{MATRIX}' trained "
                    f"to step {trained_to} by another run; a fresh run needs a fresh server "
                    f"(restart `hfs serve-params`), or continue that run with --resume")
        if env.distributed:
            # Every rank is a worker of the store's synchronous step; all must be registered
            # before anyone pushes, or the first step would be applied with fewer workers.
            worker = f"rank-{env.rank}"
            store.register(worker)
            stack.callback(store.leave, worker)
        barrier()
        # each rank draws its own random fill
        sel_cfg = dataclasses.replace(cfg, fc=dataclasses.replace(cfg.fc, sample_num=sample_num),
                                      sampler=dataclasses.replace(cfg.sampler, seed=cfg.sampler.seed + env.rank))
        selector = build_selector(sel_cfg, store, MATRIX, self.num_classes)
        fc = SampledFC(store, selector, self.head, matrix=MATRIX, overlap_push=cfg.fc.overlap_push)
        stack.callback(fc.close)
        self.store = store
        return fc

    def _build_sharded_fc(self):
        """This rank's shard of the classifier rows (the world-size independent initial matrix)."""
        from hfs.fc.sharded import init_shard_rows, shard_bounds

        cfg = self.cfg
        self.sample_num = min(cfg.fc.sample_num, self.num_classes)
        start, end = shard_bounds(self.num_classes, self.env.rank, self.env.world_size)
        rows = init_shard_rows(start, end, cfg.model.embedding_size, cfg.fc.init, cfg.fc.init_std, cfg.train.seed)
        return ShardedFC(rows, self.num_classes, self.head, sample_num=self.sample_num,
                         seed=cfg.sampler.seed).to(self.device)

    def _attach_shard_selector(self, stack: ExitStack) -> None:
        """Hard negatives in sharded mode (``sampler.type`` other than random): this rank's
        own index over its own shard, see :func:`~hfs.fc.sharded.build_shard_selector`."""
        from hfs.fc.sharded import build_shard_selector

        selector = build_shard_selector(self.cfg, self.fc, self.cfg.train.batch_size)
        if selector is not None:
            self.fc.attach_selector(selector)
            stack.callback(self.fc.close)

    def _data_parallel(self, backbone: nn.Module) -> nn.Module:
        """DDP around the backbone on several ranks (the classifier stays outside: FullFC's
        gradient is averaged explicitly, ShardedFC's rows are per rank)."""
        if not self.env.distributed:
            return backbone
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(backbone, device_ids=ids)

    def _restore_store(self, store, ckpt: dict) -> None:
        tag = ckpt.get("store_snapshot")
        if not tag:
            raise HfsError(f"checkpoint {self.resume_path} has no weight-store snapshot "
                           "(it was written by a fc.mode=full run)")
        try:
            step = store.restore(tag)
        except HfsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store names what is missing
            raise HfsError(f"cannot restore weight-store snapshot '{tag}' of {self.resume_path}: {exc}") from None
        if step != ckpt["step"]:
            raise HfsError(f"weight-store snapshot '{tag}' is at step {step}, checkpoint at {ckpt['step']}")

    def _load_state(self, ckpt: dict) -> DataPosition:
        from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

        backbone_state = dict(ckpt["backbone"])
        consume_prefix_in_state_dict_if_present(backbone_state, "module.")  # saved from a DDP wrapper
        optimizer_state = ckpt["optimizer"]
        try:
            self.backbone.load_state_dict(backbone_state)
            if self.mode == "full":
                self.fc.load_state_dict(ckpt["fc"])
            elif self.mode == "sharded":
                self.fc.load_full_weight(ckpt["fc"]["weight"].to(self.device))
                optimizer_state = self._shard_optimizer_state(optimizer_state)
        except (RuntimeError, ValueError) as exc:
            raise HfsError(f"checkpoint {self.resume_path} does not fit model.arch={self.cfg.model.arch} "
                           f"embedding_size={self.cfg.model.embedding_size}: {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        ckpt_io.restore_rng(ckpt["rng"])
        self.step = int(ckpt["step"])
        log.info("resumed from %s at step %d", self.resume_path, self.step)
        return self._rescale_position(DataPosition(**ckpt["data"]), ckpt)

    def _rescale_position(self, pos: DataPosition, ckpt: dict) -> DataPosition:
        """Keep the data position when the global batch changed (another world size):
        continue after the same number of images of the same epoch's permutation."""
        old = int(ckpt.get("world_size", 1)) * int(ckpt["config"]["train"]["batch_size"])
        new = self.env.world_size * self.cfg.train.batch_size
        if old == new:
            return pos
        log.info("global batch %d -> %d: data position rescaled", old, new)
        return DataPosition(pos.epoch, pos.batch * old // new)

    def _fc_param_index(self) -> int:
        """The classifier's index in the optimizer's state (it is the last parameter)."""
        return sum(len(group["params"]) for group in self.optimizer.param_groups) - 1

    def _shard_optimizer_state(self, state: dict) -> dict:
        """A checkpoint's optimizer state with the classifier's momentum cut to this rank's rows."""
        from hfs.fc.sharded import shard_of

        index = self._fc_param_index()
        per_param = dict(state["state"])
        if index in per_param and "momentum_buffer" in per_param[index]:
            buf = per_param[index]["momentum_buffer"]
            if buf is not None:
                per_param[index] = {**per_param[index], "momentum_buffer": shard_of(buf, self.num_classes)}
        return {**state, "state": per_param}

    def _full_optimizer_state(self) -> dict | None:
        """The optimizer state with the sharded classifier's momentum whole, in global row
        order, on rank 0 (None elsewhere); every rank calls."""
        from hfs.fc.sharded import gather_shards

        state = self.optimizer.state_dict()
        index = self._fc_param_index()
        buf = state["state"].get(index, {}).get("momentum_buffer")
        full = gather_shards(buf, self.num_classes) if buf is not None else None
        if not self.env.is_main:
            return None
        if full is not None:
            state["state"][index] = {**state["state"][index], "momentum_buffer": full}
        return state

    # ------------------------------------------------------------------ one step
    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if isinstance(self.fc, SampledFC):
            o = self.cfg.optim
            self.fc.set_hparams(lr * self.cfg.fc.lr_scale, o.momentum, o.weight_decay)
        return lr

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns loss/accuracy/images."""
        accum = self.cfg.train.grad_accum
        loss_sum, correct, seen = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0
        grad_scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        # SampledFC divides pushed row gradients by this: the shared store sums W ranks' pushes
        push_scale = grad_scale * (self.env.world_size if isinstance(self.fc, SampledFC) else 1)
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
        self._average_dense_fc_grad()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.fc, (SampledFC, ShardedFC)):
            self.fc.end_step(step)
        loss_total, correct_total = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
        return {"loss": loss_total / accum, "correct": int(round(correct_total)), "images": seen}

    def _grad_sync(self, last_micro: bool):
        """DDP all-reduces the backbone's gradients once per cycle, on the last micro-batch."""
        if self.env.distributed and not last_micro:
            return self.model.no_sync()
        return nullcontext()

    def _average_dense_fc_grad(self) -> None:
        """FullFC lives outside DDP: average its gradient over ranks as DDP does the backbone's."""
        if self.env.distributed and self.mode == "full" and self.fc.weight.grad is not None:
            import torch.distributed as dist

            dist.all_reduce(self.fc.weight.grad, op=dist.ReduceOp.SUM)
            self.fc.weight.grad.div_(self.env.world_size)

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
        """Top-1 over ALL classes on the validation set (the matrix is scanned in chunks).

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
            if self.mode == "sharded":
                pred = self.fc.predict(feats)
            else:
                pred = predict_all_classes(self.head, feats, self.fc.iter_chunks())
        finally:
            self.backbone.train()
        hits, count = all_reduce_sum([(pred[:valid] == labels[:valid]).sum().item(), valid], self.device)
        return float(hits / count)

    def verify(self) -> dict[str, float]:
        """Verification accuracy on each of eval.bins (10-fold protocol of `hfs verify`)."""
        if not self.cfg.eval.bins:
            return {}
        from hfs.eval.evaluate import evaluate_bins, load_verification_sets

        if self._verification_sets is None:  # read and unpickle each .bin once per run
            self._verification_sets = load_verification_sets(self.cfg.eval.bins)
        e = self.cfg.eval
        results = evaluate_bins(self.backbone, self._verification_sets, self.cfg.data.image_size,
                                batch_size=e.batch_size, flip=e.flip, device=self.device, folds=e.folds,
                                num_workers=e.num_workers)
        return {name: float(r["accuracy"]) for name, r in results.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write the checkpoint of this step (rank 0 writes; every rank must call).

        World-size independent: the backbone without DDP's ``module.`` prefix, the sharded
        classifier and its momentum gathered whole in global row order, the store's rows in
        its snapshot, and the world size so a resume on another one can rescale the data
        position.
        """
        snapshot = None
        if isinstance(self.fc, SampledFC):
            self.fc.wait()
            barrier()  # every rank's push of this step is in, so the store has applied it
            if self.env.is_main:
                snapshot = self.store.snapshot()  # the store's own step-named (and pruned) snapshot
        fc_state: dict[str, Any] | None = None
        optimizer_state = self.optimizer.state_dict()
        if isinstance(self.fc, FullFC):
            fc_state = self.fc.state_dict()
        elif self.mode == "sharded":
            fc_state = {"weight": self.fc.full_weight()}
            optimizer_state = self._full_optimizer_state()
        if not self.env.is_main:
            return ckpt_io.checkpoint_path(self.cfg.train.output_dir, self.step)
        payload: dict[str, Any] = {
            "config": self.cfg.to_dict(), "fc_mode": self.mode, "num_classes": self.num_classes,
            "world_size": self.env.world_size,
            "backbone": self.backbone.state_dict(),
            "fc": fc_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt_io.capture_rng(),
            "data": dataclasses.asdict(self.stream.position),
            "store_snapshot": snapshot,
        }
        path = ckpt_io.save_checkpoint(self.cfg.train.output_dir, self.step, payload, self.cfg.train.keep_checkpoints)
        log.debug("checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        from hfs.utils.log import progress

        cfg = self.cfg
        t_start = time.perf_counter()
        with ExitStack() as stack:
            self._setup(stack)
            start = self.step
            main = self.env.is_main  # rank 0 alone writes metrics and shows progress
            metrics = MetricsWriter(cfg.train.output_dir, resume_step=start if self.ckpt else None) if main else None
            if metrics is not None:
                stack.callback(metrics.close)
            stack.enter_context(self._stop_on_signals())
            self.backbone.train()
            result = TrainResult(steps=start, start_step=start, seconds=0.0, mode=self.mode,
                                 num_classes=self.num_classes,
                                 active_classes=self.num_classes if self.mode == "full" else self.sample_num)
            last_ckpt: Path | None = None
            pos = self.stream.position
            self._epochs_done = pos.epoch + (1 if pos.batch >= self.stream.batches_per_epoch else 0)
            window = _Window(self._sampler_seconds(), self.env.distributed)
            bar = stack.enter_context(progress(self.console if main else _quiet_console()))
            task = bar.add_task(f"train ({self.mode})", total=self.total_steps, completed=start, info="")
            stopped = False
            while self.step < self.total_steps:
                if self._agreed_stop():
                    stopped = True
                    break
                lr = self._set_lr(self.step)
                stats = self.train_step(self.step)
                self.step += 1
                window.add(stats)
                record = {"step": self.step, "lr": lr}
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    record.update(window.flush(self._sampler_seconds()))
                    record.update(self._index_upkeep())
                    result.loss, result.train_acc = record["loss"], record["acc"]
                    bar.update(task, info=_progress_info(record))
                if cfg.train.val_every and self.step % cfg.train.val_every == 0 and self.step < self.total_steps:
                    record["val_top1"] = result.val_top1 = self.validate()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps and main:
                    result.verification = self.verify()  # rank 0 alone: no collectives, nothing to split
                    record.update({f"verify_{k}": v for k, v in result.verification.items()})
                if len(record) > 2 and metrics is not None:
                    metrics.write(record)
                if self._checkpoint_due():
                    last_ckpt = self.save()
                bar.update(task, completed=self.step)
                for callback in self.callbacks:
                    callback(self, self.step, record)
            result.interrupted = stopped
            if not result.interrupted:
                final = {"step": self.step, "val_top1": self.validate()}
                result.val_top1 = final["val_top1"]
                if metrics is not None:
                    result.verification = self.verify()
                    final.update({f"verify_{k}": v for k, v in result.verification.items()})
                    metrics.write(final)
            if last_ckpt is None or last_ckpt != ckpt_io.checkpoint_path(cfg.train.output_dir, self.step):
                last_ckpt = self.save()
            if result.interrupted and main:
                command = "hfs train-dist" if self.launched else "hfs train"
                log.warning("%s: stopped after step %d; continue with `%s --resume %s`",
                            self._stop_reason or "a peer rank stopped", self.step, command, last_ckpt)
            result.steps, result.checkpoint = self.step, str(last_ckpt)
        result.seconds = time.perf_counter() - t_start
        return result

    def _checkpoint_due(self) -> bool:
        """Every train.checkpoint_every steps, and when an epoch completes per checkpoint_every_epochs."""
        t = self.cfg.train
        if t.checkpoint_every and self.step % t.checkpoint_every == 0:
            return True
        pos = self.stream.position
        epochs_done = pos.epoch + (1 if pos.batch >= self.stream.batches_per_epoch else 0)
        new_epoch = epochs_done > self._epochs_done
        self._epochs_done = epochs_done
        return bool(t.checkpoint_every_epochs and new_epoch and epochs_done % t.checkpoint_every_epochs == 0)

    def _index_upkeep(self) -> dict[str, float]:
        """The selector's own account: background build CPU share, rebuilds so far, drift."""
        upkeep = getattr(getattr(self.fc, "selector", None), "upkeep", None)
        if upkeep is None:
            return {}
        u = upkeep()
        return {"index_bg_share": float(u.get("bg_share", 0.0)), "index_rebuilds": int(u.get("rebuilds", 0)),
                "index_drift": float(u.get("drift", 0.0))}

    def _sampler_seconds(self) -> float:
        return self.fc.sampler_seconds() if isinstance(self.fc, (SampledFC, ShardedFC)) else 0.0


def _quiet_console():
    """A console that prints nothing: ranks other than 0 run the same loop silently."""
    from rich.console import Console

    return Console(quiet=True)


class _Window:
    """Loss/accuracy/throughput since the last log line (over all ranks when distributed)."""

    def __init__(self, sampler_seconds: float, all_ranks: bool = False) -> None:
        self.all_ranks = all_ranks
        self._reset(sampler_seconds)

    def _reset(self, sampler_seconds: float) -> None:
        self.t0, self.s0 = time.perf_counter(), sampler_seconds
        self.loss, self.correct, self.images, self.steps = 0.0, 0, 0, 0

    def add(self, stats: dict) -> None:
        self.loss += stats["loss"]
        self.correct += stats["correct"]
        self.images += stats["images"]
        self.steps += 1

    def flush(self, sampler_seconds: float) -> dict[str, float]:
        """Every rank calls this at the same steps: loss is the mean over ranks, accuracy and
        throughput count every rank's images."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        if self.all_ranks:
            loss, self.correct, self.images, ranks = all_reduce_sum([self.loss, self.correct, self.images, 1])
            self.loss = loss / ranks
        out = {"loss": self.loss / max(self.steps, 1), "acc": self.correct / max(self.images, 1),
               "samples_per_s": self.images / elapsed, "upkeep_share": (sampler_seconds - self.s0) / elapsed}
        self._reset(sampler_seconds)
        return out


def _progress_info(record: dict) -> str:
    return (f"loss {record['loss']:.3f} acc {record['acc']:.1%} {record['samples_per_s']:.0f} img/s "
            f"upkeep {record['upkeep_share']:.0%} lr {record['lr']:.3g}")


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
    table.add_row("last loss / train acc", f"{result.loss:.4f} / {result.train_acc:.1%}")
    if result.val_top1 is not None:
        table.add_row("val top-1 (all classes)", f"{result.val_top1:.2%}")
    for name, acc in result.verification.items():
        table.add_row(f"verification {name}", f"{acc:.2%}")
    table.add_row("checkpoint", result.checkpoint)
    (console or make_console()).print(table)
