"""Verification end to end: .bin sets -> embeddings -> metrics, for the CLI and for the trainer.

:func:`evaluate_bins` is what the trainer calls during training; :func:`evaluate_sets` and
:func:`verify_features` are what ``hfs verify`` runs with ``--checkpoint`` and ``--features``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from hfs.data.bins import bin_name, load_bin
from hfs.eval.extract import EncodedImages, extract_features
from hfs.eval.verification import DEFAULT_FAR_TARGET, VerificationResult, evaluate_embeddings
from hfs.utils.errors import HfsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hfs.config import HfsConfig


@dataclass
class VerificationSet:
    """One loaded .bin: 2N encoded images (pairs 2i, 2i+1) and N same/different flags."""

    path: Path
    images: list[bytes]
    issame: np.ndarray

    @property
    def name(self) -> str:
        return bin_name(self.path)

    @property
    def pairs(self) -> int:
        return len(self.issame)

    @classmethod
    def load(cls, path: str | Path) -> "VerificationSet":
        images, issame = load_bin(path)
        return cls(Path(path), images, issame)


def load_verification_sets(bins: Iterable[str | Path | VerificationSet]) -> list[VerificationSet]:
    """Load the paths among ``bins``; already loaded sets pass through (the trainer loads once)."""
    return [b if isinstance(b, VerificationSet) else VerificationSet.load(b) for b in bins]


def unique_names(sets: Sequence[VerificationSet]) -> list[str]:
    """Display names (``lfw``), falling back to the full path when two sets share a stem."""
    stems = [s.name for s in sets]
    return [s.name if stems.count(s.name) == 1 else str(s.path) for s in sets]


def verify_features(features: np.ndarray, vset: VerificationSet, folds: int = 10,
                    far_target: float = DEFAULT_FAR_TARGET, source: str = "features") -> VerificationResult:
    """Metrics of ``features`` (rows in the .bin's image order) against the set's pairs."""
    if features.ndim != 2 or len(features) != 2 * vset.pairs:
        raise HfsError(f"{source} has {len(features)} feature rows but {vset.path} has {vset.pairs} pairs "
                       f"(needs {2 * vset.pairs} rows, one per image in .bin order)")
    try:
        return evaluate_embeddings(features, vset.issame, folds=folds, far_target=far_target)
    except ValueError as exc:
        raise HfsError(f"{vset.path}: {exc}") from None


def evaluate_sets(model, sets: Sequence[VerificationSet], image_size: int, *, batch_size: int = 256,
                  flip: bool = False, device: "str | torch.device | None" = None, folds: int = 10,
                  far_target: float = DEFAULT_FAR_TARGET, num_workers: int = 0,
                  show_progress: bool = True) -> dict[str, VerificationResult]:
    """Embed every set with ``model`` and score it; keys are the sets' display names."""
    results = {}
    for name, vset in zip(unique_names(sets), sets):
        images = EncodedImages(vset.images, image_size, source=str(vset.path))
        feats = extract_features(model, images, batch_size=batch_size, flip=flip, device=device,
                                 num_workers=num_workers, show_progress=show_progress, description=name)
        results[name] = verify_features(feats, vset, folds, far_target, source=f"the model's output for {name}")
    return results


def evaluate_bins(model, bin_paths: Sequence[str | Path | VerificationSet], image_size: int,
                  batch_size: int = 256, flip: bool = False, device: "str | torch.device | None" = None,
                  folds: int = 10, num_workers: int = 0, show_progress: bool = False,
                  far_target: float = DEFAULT_FAR_TARGET) -> dict[str, dict]:
    """Verification scores of ``model`` on each .bin, for logging during training.

    Returns ``{name: {"accuracy", "accuracy_std", "best_threshold", "val", "val_std", "far",
    "far_target", "auc", "eer", "pairs", "folds", "fold_accuracies", "fold_thresholds"}}``.
    Pass :class:`VerificationSet` objects (``load_verification_sets``) instead of paths to
    read and unpickle each file only once per run. The model's train/eval mode is restored.
    """
    sets = load_verification_sets(bin_paths)
    results = evaluate_sets(model, sets, image_size, batch_size=batch_size, flip=flip, device=device,
                            folds=folds, far_target=far_target, num_workers=num_workers,
                            show_progress=show_progress)
    return {name: res.to_dict() for name, res in results.items()}


def _warn_if_extracted_from_another_set(feat_path: Path, vset: VerificationSet) -> None:
    """The JSON ``hfs extract`` writes beside the features names its .bin: catch swapped --features."""
    import json
    import logging

    from hfs.eval.extract import features_meta_path

    try:
        meta = json.loads(features_meta_path(feat_path).read_text())
    except (OSError, ValueError):
        return
    source = meta.get("bin") if isinstance(meta, dict) else None
    if source and Path(source).name != vset.path.name:
        logging.getLogger(__name__).warning("%s was extracted from %s, but is scored against %s",
                                            feat_path, source, vset.path)


def verify_feature_files(bins: Sequence[str | Path], features: Sequence[str | Path], folds: int = 10,
                         far_target: float = DEFAULT_FAR_TARGET) -> tuple[dict[str, VerificationResult], dict]:
    """Score saved features (``hfs extract`` output), one features file per .bin, in order.

    Returns the results and, per set, where its numbers came from (for the JSON summary).
    """
    from hfs.eval.extract import read_features

    if len(features) != len(bins):
        raise HfsError(f"{len(features)} --features file(s) for {len(bins)} --bin file(s); give one per .bin, "
                       "in the same order")
    sets = load_verification_sets(bins)
    results, sources = {}, {}
    for name, vset, feat_path in zip(unique_names(sets), sets, features):
        _warn_if_extracted_from_another_set(Path(feat_path), vset)
        results[name] = verify_features(read_features(feat_path), vset, folds, far_target, source=str(feat_path))
        sources[name] = {"bin": str(vset.path), "features": str(feat_path)}
    return results, sources


def resolve_checkpoint_path(checkpoint: str | Path, output_dir: str | Path | None = None) -> Path:
    """The checkpoint file a --checkpoint value means: a file, a run folder (its latest checkpoint),
    or ``latest`` (the latest one in ``output_dir``, the config's ``train.output_dir``)."""
    from hfs.checkpoint import resolve_checkpoint

    spec = str(checkpoint)
    if spec == "latest" and output_dir is None:
        raise HfsError("--checkpoint latest: no run folder to look in (set train.output_dir)")
    return resolve_checkpoint(spec, "." if output_dir is None else output_dir, flag="--checkpoint")


def load_checkpoint_model(checkpoint: str | Path, device: "str | torch.device | None" = "auto",
                          output_dir: str | Path | None = None):
    """(backbone in eval mode on ``device``, the run's HfsConfig, the checkpoint file used).

    ``checkpoint`` is resolved by :func:`resolve_checkpoint_path`.
    """
    from hfs.utils.device import resolve_device
    from hfs.models.loading import load_backbone

    path = resolve_checkpoint_path(checkpoint, output_dir)
    model, cfg = load_backbone(path, map_location=resolve_device(device, "--device"))
    return model, cfg, path


@dataclass
class EmbeddingModel:
    """A backbone ready to embed images, whether a trained checkpoint's torch module or an exported
    .onnx run by onnxruntime: both are called the same way, so extraction has one code path."""

    model: "torch.nn.Module"
    image_size: int
    device: "torch.device"
    source: Path
    meta: dict = field(default_factory=dict)  # arch, image_size (+ format: onnx) for the JSON summaries

    @property
    def is_onnx(self) -> bool:
        return self.meta.get("format") == "onnx"


def load_embedding_model(checkpoint: str | Path, device: "str | torch.device | None" = "auto",
                         output_dir: str | Path | None = None) -> EmbeddingModel:
    """The --checkpoint of ``hfs extract`` / ``hfs verify``: an hfs checkpoint (file, run folder,
    ``latest``) or an ``.onnx`` file from ``hfs export``, which runs on onnxruntime's CPU provider."""
    from hfs.eval.onnx_model import OnnxBackbone, is_onnx_path
    from hfs.utils.device import resolve_device

    if not is_onnx_path(checkpoint):
        model, cfg, path = load_checkpoint_model(checkpoint, device, output_dir)
        return EmbeddingModel(model, cfg.data.image_size, resolve_device(device, "--device"), path,
                              {"arch": cfg.model.arch, "image_size": cfg.data.image_size})
    path = Path(checkpoint)
    if not path.is_file():
        raise HfsError(f"--checkpoint {path} does not exist")
    wanted = resolve_device(device, "--device")
    if device not in (None, "auto") and wanted.type != "cpu":
        logging.getLogger(__name__).warning("--device %s: an .onnx model runs on onnxruntime's CPU provider", device)
    model = OnnxBackbone(path)
    return EmbeddingModel(model, model.image_size, resolve_device("cpu"), path, model.describe())


def extract_checkpoint(checkpoint: str | Path, out: str | Path, *, bin_path: str | Path | None = None,
                       list_path: str | Path | None = None, prefix: str | Path | None = None,
                       flip: bool = False, batch_size: int = 256, device: str = "auto",
                       num_workers: int = 2, output_dir: str | Path | None = None) -> Path:
    """``hfs extract``: a checkpoint's (or exported .onnx's) embeddings of a .bin (in its order) or of
    a file list.

    Writes ``out`` (float32 N x D .npy) and a JSON beside it; returns the JSON's path.
    """
    from hfs.eval.extract import list_image_paths, write_features

    if (bin_path is None) == (list_path is None):
        raise HfsError("give exactly one of --bin FILE or --list FILE (with --prefix)")
    if prefix is not None and list_path is None:
        raise HfsError("--prefix goes with --list")
    if Path(out).suffix != ".npy":
        raise HfsError(f"--out {out}: features are written as .npy; give a path ending in .npy")
    if bin_path is not None:
        images, _ = load_bin(bin_path)
        source, where = str(bin_path), {"bin": str(bin_path)}
    else:
        prefix = Path(list_path).parent if prefix is None else Path(prefix)
        images = list_image_paths(list_path, prefix)
        source, where = str(list_path), {"list": str(list_path), "prefix": str(prefix)}
    em = load_embedding_model(checkpoint, device, output_dir)
    feats = extract_features(em.model, EncodedImages(images, em.image_size, source), batch_size=batch_size,
                             flip=flip, device=em.device, num_workers=num_workers, description=Path(source).name)
    meta = {"checkpoint": str(em.source), **em.meta, "flip": flip, **where}
    return write_features(out, feats, meta)


def verify_checkpoint(bins: Sequence[str | Path], checkpoint: str | Path, *, folds: int = 10,
                      far_target: float = DEFAULT_FAR_TARGET, flip: bool = False, batch_size: int = 256,
                      device: str = "auto", num_workers: int = 2,
                      output_dir: str | Path | None = None) -> tuple[dict[str, VerificationResult], dict]:
    """``hfs verify --checkpoint``: embed each .bin with the checkpoint's backbone (or an exported
    .onnx) and score it."""
    sets = load_verification_sets(bins)
    em = load_embedding_model(checkpoint, device, output_dir)
    results = evaluate_sets(em.model, sets, em.image_size, batch_size=batch_size, flip=flip, device=em.device,
                            folds=folds, far_target=far_target, num_workers=num_workers)
    onnx = {"format": "onnx"} if em.is_onnx else {}
    sources = {name: {"bin": str(s.path), "checkpoint": str(em.source), "flip": flip, **onnx}
               for name, s in zip(results, sets)}
    return results, sources


def run_verify(cfg: "HfsConfig", *, features: Sequence[str | Path] = (), checkpoint: str | Path | None = None,
               flip: bool | None = None, device: str = "auto", plot: str | Path | None = None,
               json_out: str | Path | None = None, console=None) -> dict[str, VerificationResult]:
    """`hfs verify`: check the request, score every set of ``eval.bins`` from precomputed
    ``features`` (one per set) or by embedding it with ``checkpoint``, then print the table
    and write the JSON and the ROC plot. ``flip`` None means ``eval.flip``."""
    from hfs.eval.report import plot_roc, require_matplotlib, results_table, write_results_json
    from hfs.utils.log import make_console

    if plot:
        require_matplotlib()  # fail before the work, not after
    ecfg = cfg.eval
    bins = [Path(b) for b in ecfg.bins]
    if not bins:
        raise HfsError("no verification set: give --bin FILE (or set eval.bins)")
    if bool(features) == bool(checkpoint):
        raise HfsError("give either --features FILE.npy (one per --bin) or --checkpoint CKPT")
    if checkpoint:
        results, sources = verify_checkpoint(
            bins, checkpoint, folds=ecfg.folds, far_target=ecfg.far_target, flip=ecfg.flip if flip is None else flip,
            batch_size=ecfg.batch_size, device=device, num_workers=ecfg.num_workers, output_dir=cfg.train.output_dir)
    else:
        if flip is not None:
            logging.getLogger(__name__).warning("--flip has no effect with --features: flipping happens at extraction (hfs extract --flip)")
        results, sources = verify_feature_files(bins, features, ecfg.folds, ecfg.far_target)
    (console or make_console()).print(results_table(results))
    if json_out:
        write_results_json(json_out, results, sources)
    if plot:
        plot_roc(plot, results)
    return results
