"""What the training loop does around each step, as hooks: logging, validation, metrics, checkpoints.

The loop is: batch -> forward -> backward -> step -> ``hook.on_step_end`` for each hook in
order. A hook is any object with the three methods of :class:`Hook` (``hfs.eval`` adds
verification this way without the trainer importing it). Every rank runs every hook at
the same steps, so hooks may call collectives; those that write (metrics, progress) act
on rank 0 only. ``record`` is the step's metrics line: hooks add to it, and
:class:`MetricsHook` writes it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from hfs import checkpoint as ckpt_io
from hfs.dist import all_reduce_sum
from hfs.train.cpu_hint import CpuHintHook
from hfs.train.metrics import MetricsWriter, open_metrics
from hfs.train.plain_log import PlainLog

if TYPE_CHECKING:
    from hfs.config import HfsConfig
    from hfs.train.trainer import Trainer

StepCallback = Callable[["Trainer", int, dict], None]


class Hook(Protocol):
    """Called by :meth:`Trainer.run` on every rank; ``trainer.result`` is the run's :class:`TrainResult`."""

    def on_start(self, trainer: "Trainer") -> None:
        """After setup, before the first step (resumed runs: ``trainer.step`` is the checkpoint's)."""

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        """After optimizer step ``trainer.step`` (already counted); ``stats`` is that step's loss/correct/images."""

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After the loop (``trainer.result.interrupted`` says whether a stop ended it)."""


class BaseHook:
    """A hook that does nothing: subclasses override what they need."""

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        pass

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        pass


def log_due(trainer: "Trainer") -> bool:
    return trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.total_steps


class LogHook(BaseHook):
    """Loss, accuracy, throughput and the classifier's upkeep every ``train.log_every`` steps,
    into the record and the progress line."""

    def __init__(self, progress: "ProgressHook") -> None:
        self.progress = progress

    def on_start(self, trainer: "Trainer") -> None:
        self.window = _Window(trainer.fc.sampler_seconds(), trainer.env.distributed)

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        self.window.add(stats)
        if not log_due(trainer):
            return
        record.update(self.window.flush(trainer.fc.sampler_seconds()))
        record.update(trainer.fc.upkeep())
        trainer.result.loss, trainer.result.train_acc = record["loss"], record["acc"]
        self.progress.show(record)

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if self.window.steps:  # stopped between log lines: report the steps since the last one
            done = self.window.flush(trainer.fc.sampler_seconds())
            trainer.result.loss, trainer.result.train_acc = done["loss"], done["acc"]


class ValidationHook(BaseHook):
    """Top-1 over all classes every ``train.val_every`` steps and at the end (all ranks score their share)."""

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        every = trainer.cfg.train.val_every
        if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            record["val_top1"] = trainer.result.val_top1 = trainer.validate()

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if not trainer.result.interrupted:
            record["val_top1"] = trainer.result.val_top1 = trainer.validate()


class MetricsHook(BaseHook):
    """Rank 0 appends each record with more than step and lr to metrics.jsonl, and the final one."""

    def __init__(self, writer: MetricsWriter | None) -> None:
        self.writer = writer

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        if len(record) > 2 and self.writer is not None:
            self.writer.write(record)

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if not trainer.result.interrupted and self.writer is not None:
            self.writer.write(record)


class CheckpointHook(BaseHook):
    """A checkpoint every ``train.checkpoint_every`` steps, per ``checkpoint_every_epochs``, and at the end."""

    def on_start(self, trainer: "Trainer") -> None:
        self.last: Path | None = None
        self._epochs_done = self._epochs_completed(trainer)

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        if self._due(trainer):
            self.last = trainer.save()

    def on_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if self.last is None or self.last != ckpt_io.checkpoint_path(trainer.cfg.train.output_dir, trainer.step):
            self.last = trainer.save()
        trainer.result.checkpoint = str(self.last)

    @staticmethod
    def _epochs_completed(trainer: "Trainer") -> int:
        pos = trainer.stream.position
        return pos.epoch + (1 if pos.batch >= trainer.stream.batches_per_epoch else 0)

    def _due(self, trainer: "Trainer") -> bool:
        t = trainer.cfg.train
        if t.checkpoint_every and trainer.step % t.checkpoint_every == 0:
            return True
        epochs_done = self._epochs_completed(trainer)
        new_epoch = epochs_done > self._epochs_done
        self._epochs_done = epochs_done
        return bool(t.checkpoint_every_epochs and new_epoch and epochs_done % t.checkpoint_every_epochs == 0)


class ProgressHook(BaseHook):
    """The progress bar (rank 0; a silent console elsewhere), opened on ``stack``."""

    def __init__(self, stack: ExitStack, console: Any) -> None:
        self.stack, self.console = stack, console

    def on_start(self, trainer: "Trainer") -> None:
        from hfs.utils.log import progress

        self.bar = self.stack.enter_context(progress(self.console if trainer.env.is_main else _quiet_console()))
        self.task = self.bar.add_task(f"train ({trainer.cfg.fc.mode})", total=trainer.total_steps,
                                      completed=trainer.step, info="")
        self.plain = PlainLog(trainer.total_steps, trainer.step) if trainer.env.is_main else None

    def show(self, record: dict[str, Any]) -> None:
        self.bar.update(self.task, info=_progress_info(record))
        if self.plain is not None:  # stdout not a terminal (nohup, sbatch, | tee): one plain line
            self.plain.line(record)

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        self.bar.update(self.task, completed=trainer.step)


class CallbackHook(BaseHook):
    """Plain ``callback(trainer, step, record)`` functions, after everything else of a step."""

    def __init__(self, callbacks: list[StepCallback]) -> None:
        self.callbacks = callbacks

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float], record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(trainer, trainer.step, record)


def build_metrics_writer(cfg: "HfsConfig", resume_step: int | None, is_main: bool,
                         stack: ExitStack) -> MetricsWriter | None:
    """The run's loggers (``train.loggers``; rank 0 only), records past ``resume_step`` dropped."""
    if not is_main:
        return None
    writer = open_metrics(cfg, resume_step=resume_step)
    stack.callback(writer.close)
    return writer


def default_hooks(trainer: "Trainer", stack: ExitStack, extra: list[Any], callbacks: list[StepCallback]) -> list[Any]:
    """The loop's hooks in order; ``extra`` (e.g. verification) add to the record before it is written."""
    writer = build_metrics_writer(trainer.cfg, trainer.step if trainer.ckpt else None,
                                  trainer.env.is_main, stack)
    progress = ProgressHook(stack, trainer.console)
    return [progress, CpuHintHook(), LogHook(progress), ValidationHook(), *extra, MetricsHook(writer), CheckpointHook(),
            CallbackHook(callbacks)]


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
