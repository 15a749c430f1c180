"""Verification during training, as a trainer hook (``hfs.train.hooks.Hook``, implemented structurally).

`hfs train`, `hfs train-dist` and the demo pass :func:`verification_hooks` to the trainer,
which never imports ``hfs.eval`` itself. Rank 0 alone verifies: no collectives, nothing
to split.
"""

from __future__ import annotations

from typing import Any


class VerificationHook:
    """Accuracy on each of ``eval.bins`` (the 10-fold protocol of `hfs verify`) every
    ``eval.every`` steps and at the end; the .bin files are read once per run."""

    def __init__(self, eval_cfg: Any, image_size: int) -> None:
        self.cfg, self.image_size = eval_cfg, image_size
        self._sets = None

    def on_start(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, stats: dict[str, float]) -> dict[str, float]:
        every, step = self.cfg.every, trainer.step
        if every and step % every == 0 and step < trainer.total_steps and trainer.env.is_main:
            return self._measure(trainer)
        return {}

    def on_end(self, trainer: Any) -> dict[str, float]:
        if not trainer.result.interrupted and trainer.env.is_main:
            return self._measure(trainer)
        return {}

    def on_record(self, trainer: Any, record: Any, final: bool) -> None:
        pass

    def _measure(self, trainer: Any) -> dict[str, float]:
        """Verify now; the accuracies go into the run's result and, as ``verify_<name>``, the record."""
        trainer.result.verification = self.verify(trainer.backbone, trainer.device)
        return {f"verify_{k}": v for k, v in trainer.result.verification.items()}

    def verify(self, backbone: Any, device: Any) -> dict[str, float]:
        from hfs.eval.evaluate import evaluate_bins, load_verification_sets

        if self._sets is None:  # read and unpickle each .bin once per run
            self._sets = load_verification_sets(self.cfg.bins)
        e = self.cfg
        results = evaluate_bins(backbone, self._sets, self.image_size, batch_size=e.batch_size, flip=e.flip,
                                device=device, folds=e.folds, num_workers=e.num_workers)
        return {name: float(r["accuracy"]) for name, r in results.items()}


def verification_hooks(cfg: Any) -> list[VerificationHook]:
    """The trainer hooks that verify on ``cfg.eval.bins`` (none when it is empty); picklable
    by reference, so `hfs train-dist` hands it to its spawned workers."""
    return [VerificationHook(cfg.eval, cfg.data.image_size)] if cfg.eval.bins else []
