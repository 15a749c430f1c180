"""What the training loop does around each step, as hooks: logging, validation, metrics, checkpoints.

The loop is: batch -> forward -> backward -> step -> the hooks, in two rounds. First each
hook's ``on_step_end`` returns what it measured (loss, validation, verification ...); the
trainer gathers those into the step's record (two hooks may not report the same key). Then
every hook's ``on_record`` gets the finished record, read-only, to show, write or act on
(progress, metrics, checkpoints, callbacks). So data flows one way, from the measuring hooks
to the record's readers, whatever the order within a round; the order of the list only
orders side effects (a checkpoint is written after its step's metrics line). After the
loop ``on_end`` and ``on_record(final=True)`` do the same for the run's last record.

A hook is any object with the four methods of :class:`Hook` (``hfs.eval`` adds verification
this way without the trainer importing it). Every rank runs every hook at the same steps,
so hooks may call collectives; those that write (metrics, progress) act on rank 0 only.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from hfs import checkpoint as ckpt_io
from hfs.dist import all_reduce_sum
from hfs.train.cpu_hint import CpuHintHook
from hfs.train.metrics import MetricsWriter, open_metrics
from hfs.train.plain_log import PlainLog

if TYPE_CHECKING:
    from hfs.config import HfsConfig
    from hfs.train.trainer import Trainer

StepCallback = Callable[["Trainer", int, Mapping[str, Any]], None]


class Hook(Protocol):
    """Called by :meth:`Trainer.run` on every rank; ``trainer.result`` is the run's :class:`TrainResult`."""

    def on_start(self, trainer: "Trainer") -> None:
        """After setup, before the first step (resumed runs: ``trainer.step`` is the checkpoint's)."""

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float]) -> Mapping[str, Any]:
        """After optimizer step ``trainer.step`` (already counted; ``stats``: its loss/correct/images):
        what this hook measured, for the step's record ({}: nothing)."""

    def on_end(self, trainer: "Trainer") -> Mapping[str, Any]:
        """After the loop (``trainer.result.interrupted`` says whether a stop ended it): what this
        hook measured, for the run's final record."""

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        """The step's record (``final``: the run's last one), complete and read-only."""


class BaseHook:
    """A hook that does nothing: subclasses override what they need."""

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float]) -> Mapping[str, Any]:
        return {}

    def on_end(self, trainer: "Trainer") -> Mapping[str, Any]:
        return {}

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        pass


def gather_record(record: dict[str, Any], hooks: list[Any], measures: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``record`` with every hook's measures added; a key two hooks report is an error (not a silent overwrite)."""
    for hook, measured in zip(hooks, measures):
        clash = record.keys() & measured.keys()
        if clash:
            raise RuntimeError(f"{type(hook).__name__} reports {', '.join(sorted(clash))}, already in the record")
        record.update(measured)
    return record


def log_due(trainer: "Trainer") -> bool:
    return trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.total_steps


class LogHook(BaseHook):
    """Loss, accuracy, throughput and the classifier's upkeep every ``train.log_every`` steps."""

    def on_start(self, trainer: "Trainer") -> None:
        self.window = _Window(trainer.fc.sampler_seconds(), trainer.env.distributed)

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float]) -> Mapping[str, Any]:
        self.window.add(stats)
        if not log_due(trainer):
            return {}
        measured = {**self.window.flush(trainer.fc.sampler_seconds()), **trainer.fc.upkeep()}
        trainer.result.loss, trainer.result.train_acc = measured["loss"], measured["acc"]
        return measured

    def on_end(self, trainer: "Trainer") -> Mapping[str, Any]:
        if self.window.steps:  # stopped between log lines: report the steps since the last one
            done = self.window.flush(trainer.fc.sampler_seconds())
            trainer.result.loss, trainer.result.train_acc = done["loss"], done["acc"]
        return {}


class ValidationHook(BaseHook):
    """Top-1 over all classes every ``train.val_every`` steps and at the end (all ranks score their share)."""

    def on_step_end(self, trainer: "Trainer", stats: dict[str, float]) -> Mapping[str, Any]:
        every = trainer.cfg.train.val_every
        if every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            trainer.result.val_top1 = trainer.validate()
            return {"val_top1": trainer.result.val_top1}
        return {}

    def on_end(self, trainer: "Trainer") -> Mapping[str, Any]:
        if trainer.result.interrupted:
            return {}
        trainer.result.val_top1 = trainer.validate()
        return {"val_top1": trainer.result.val_top1}


class MetricsHook(BaseHook):
    """Rank 0 appends each record with more than step and lr to metrics.jsonl, and the final one."""

    def __init__(self, writer: MetricsWriter | None) -> None:
        self.writer = writer

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        if self.writer is None or (trainer.result.interrupted if final else len(record) <= 2):
            return
        self.writer.write(dict(record))


class CheckpointHook(BaseHook):
    """A checkpoint every ``train.checkpoint_every`` steps, per ``checkpoint_every_epochs``, and at the end
    (each after its step's metrics line)."""

    def on_start(self, trainer: "Trainer") -> None:
        self.last: Path | None = None
        self._epochs_done = self._epochs_completed(trainer)

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        if not final:
            if self._due(trainer):
                self.last = trainer.save()
            return
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
    """The progress bar (rank 0; a silent console elsewhere), opened on ``stack``; a record with the
    log values (``LogHook``'s) updates its text."""

    def __init__(self, stack: ExitStack, console: Any) -> None:
        self.stack, self.console = stack, console

    def on_start(self, trainer: "Trainer") -> None:
        from hfs.utils.log import progress

        self.bar = self.stack.enter_context(progress(self.console if trainer.env.is_main else _quiet_console()))
        self.task = self.bar.add_task(f"train ({trainer.cfg.fc.mode})", total=trainer.total_steps,
                                      completed=trainer.step, info="")
        self.plain = PlainLog(trainer.total_steps, trainer.step) if trainer.env.is_main else None

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        if final:
            return
        if "loss" in record:
            self.bar.update(self.task, info=_progress_info(record))
            if self.plain is not None:  # stdout not a terminal (nohup, sbatch, | tee): one plain line
                self.plain.line(record)
        self.bar.update(self.task, completed=trainer.step)


class CallbackHook(BaseHook):
    """Plain ``callback(trainer, step, record)`` functions, after everything else of a step."""

    def __init__(self, callbacks: list[StepCallback]) -> None:
        self.callbacks = callbacks

    def on_record(self, trainer: "Trainer", record: Mapping[str, Any], final: bool) -> None:
        if not final:
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
    """The loop's hooks in order; ``extra`` (e.g. verification) measure after validation, and their
    measures are in the record the metrics and the callbacks read."""
    writer = build_metrics_writer(trainer.cfg, trainer.step if trainer.ckpt else None,
                                  trainer.env.is_main, stack)
    return [ProgressHook(stack, trainer.console), CpuHintHook(), LogHook(), ValidationHook(), *extra,
            MetricsHook(writer), CheckpointHook(), CallbackHook(callbacks)]


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


def _progress_info(record: Mapping[str, Any]) -> str:
    return (f"loss {record['loss']:.3f} acc {record['acc']:.1%} {record['samples_per_s']:.0f} img/s "
            f"upkeep {record['upkeep_share']:.0%} lr {record['lr']:.3g}")
