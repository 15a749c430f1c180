"""``hfs export``: a checkpoint's backbone as ONNX (for onnxruntime, TensorRT, ...) and/or TorchScript.

Only the embedding network is exported, never the classifier: deployment compares embeddings.
The ONNX graph has one input ``input``, float32 (batch, 3, S, S) RGB scaled to [-1, 1] (as
:class:`hfs.data.transforms.EvalTransform` makes it), and one output ``embedding``, float32
(batch, D), unnormalised; the batch dimension is dynamic, S is the run's ``data.image_size``.
The opset is :data:`ONNX_OPSET` (18), the dynamo exporter's own opset, so no version conversion
happens, and onnxruntime has run it since 1.14.

The graph comes from torch's dynamo exporter (``torch.export`` -> onnxscript), the default of
``torch.onnx.export`` in torch 2.13; the older TorchScript-based exporter cannot express the
tiny CPU backbone's adaptive pooling. It needs the ``onnx`` and ``onnxscript`` packages, and
onnxruntime runs the check below: the ``onnx`` extra brings all three.

With ``fp16`` the weights and the arithmetic are float16 while the input and the output stay
float32 (a cast at each end), so every caller feeds the same arrays. Before a file is written
the exported model is run on a batch of random images (of another batch size than the one
traced, which also proves the batch dimension dynamic) and compared with the checkpoint's
torch model; a mismatch is an error and nothing is written. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from hfs.eval.onnx_model import ONNX_INSTALL_HINT, open_session
from hfs.utils.atomic import atomic_write_bytes
from hfs.utils.errors import HfsError
from hfs.utils.optional import require

log = logging.getLogger(__name__)

ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
TRACE_BATCH = 2  # the example batch the graph is traced with (torch.export specialises sizes 0 and 1)
CHECK_BATCH = 3  # the batch the exported file is checked with: another size than the traced one
# Largest row-wise relative difference ||exported - torch|| / ||torch|| accepted by the check.
TOLERANCE = {False: 1e-3, True: 5e-2}  # fp32, fp16


@dataclass
class ExportResult:
    """What ``hfs export`` wrote, and how closely each file reproduces the checkpoint's embeddings."""

    checkpoint: Path
    arch: str
    image_size: int
    embedding_size: int
    fp16: bool
    files: dict[str, Path] = field(default_factory=dict)  # "onnx" / "torchscript" -> path
    max_rel_diff: dict[str, float] = field(default_factory=dict)


def check_output_path(path: str | Path, flag: str, suffix: str | None = None) -> Path:
    """Fail now, before any work, if ``path`` cannot be written: wrong suffix, a folder, or no
    writable folder to create it in (missing folders are created when the file is written)."""
    path = Path(path)
    if path.is_dir():
        raise HfsError(f"{flag} {path} is a folder; give a file path")
    if suffix and path.suffix.lower() != suffix:
        raise HfsError(f"{flag} {path}: give a path ending in {suffix}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise HfsError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HfsError(f"{flag} {path}: folder {folder} is not writable")
    return path


class HalfPrecision(nn.Module):
    """A float16 copy of a backbone behind float32 input and output: callers feed the same arrays."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.half()).float()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (missing torchvision ops, deprecations): not the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def max_relative_difference(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Largest ``||candidate_i - reference_i|| / ||reference_i||`` over rows: the error an embedding's
    direction sees, independent of the embedding's scale."""
    diff = np.linalg.norm(candidate.astype(np.float64) - reference, axis=1)
    norm = np.maximum(np.linalg.norm(reference.astype(np.float64), axis=1), 1e-12)
    return float(np.max(diff / norm))


def onnx_bytes(backbone: nn.Module, image_size: int, metadata: dict[str, str]) -> bytes:
    """The serialised ONNX model of ``backbone`` (opset 18, dynamic batch), ``metadata`` in its props."""
    import torch

    onnx = require("onnx", "--onnx", ONNX_INSTALL_HINT)
    require("onnxscript", "--onnx", ONNX_INSTALL_HINT)
    example = torch.zeros(TRACE_BATCH, 3, image_size, image_size)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(backbone, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=ONNX_OPSET, dynamo=True, verbose=False, external_data=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        raise HfsError(f"--onnx: torch could not export the backbone ({_first_line(exc)})") from None
    onnx.helper.set_model_props(proto, metadata)
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit; no backbone here comes near it
        raise HfsError(f"--onnx: the model does not fit in one ONNX file ({_first_line(exc)})") from None


def torchscript_bytes(backbone: nn.Module, image_size: int, metadata: dict[str, str]) -> bytes:
    """The traced backbone as a TorchScript archive (metadata in ``extra/hfs.json``).

    torch marks TorchScript deprecated in favour of torch.export, but it is still what libtorch
    (C++) and many serving stacks load, and tracing is all these feed-forward backbones need.
    """
    example = torch.zeros(TRACE_BATCH, 3, image_size, image_size)
    buf = io.BytesIO()
    try:
        with _quiet_exporter(), torch.no_grad():
            traced = torch.jit.trace(backbone, example)
            torch.jit.save(traced, buf, _extra_files={"hfs.json": json.dumps(metadata, sort_keys=True)})
    except Exception as exc:  # noqa: BLE001
        raise HfsError(f"--torchscript: torch could not trace the backbone ({_first_line(exc)})") from None
    return buf.getvalue()


def _run_onnx(data: bytes, images: np.ndarray) -> np.ndarray:
    session = open_session(data, "the exported ONNX model")
    return np.asarray(session.run(None, {INPUT_NAME: images})[0], dtype=np.float32)


def _run_torchscript(data: bytes, images: np.ndarray) -> np.ndarray:
    with _quiet_exporter(), torch.no_grad():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return module(torch.from_numpy(images)).float().numpy()


def _check(kind: str, data: bytes, reference_model: nn.Module, image_size: int, fp16: bool) -> float:
    """Run the exported bytes on random images and compare with the torch model; an error past tolerance."""
    images = np.random.default_rng(0).uniform(-1, 1, (CHECK_BATCH, 3, image_size, image_size)).astype(np.float32)
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(images)).float().numpy()
    got = (_run_onnx if kind == "onnx" else _run_torchscript)(data, images)
    if got.shape != reference.shape:
        raise HfsError(f"--{kind}: the exported model returns shape {got.shape}, torch {reference.shape}")
    diff = max_relative_difference(got, reference)
    if not diff <= TOLERANCE[fp16]:
        raise HfsError(f"--{kind}: the exported model differs from the checkpoint's by {diff:.2e} "
                       f"(relative; more than {TOLERANCE[fp16]:.0e}); nothing written")
    return diff


def export_checkpoint(checkpoint: str | Path, *, onnx: str | Path | None = None,
                      torchscript: str | Path | None = None, fp16: bool = False,
                      output_dir: str | Path | None = None) -> ExportResult:
    """``hfs export``: write the checkpoint's backbone to ``onnx`` and/or ``torchscript``.

    ``checkpoint`` is resolved as ``hfs extract`` resolves it (file, run folder, ``latest`` in
    ``output_dir``). Output paths are checked before the checkpoint is read; each file is checked
    against the torch model (see the module doc) before it is written.
    """
    from hfs.eval.evaluate import load_checkpoint_model

    if onnx is None and torchscript is None:
        raise HfsError("nothing to export: give --onnx FILE.onnx and/or --torchscript FILE.pt")
    targets = {}
    if onnx is not None:
        targets["onnx"] = check_output_path(onnx, "--onnx", ".onnx")
        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "--onnx", ONNX_INSTALL_HINT)
    if torchscript is not None:
        targets["torchscript"] = check_output_path(torchscript, "--torchscript")
    if len({p.resolve() for p in targets.values()}) < len(targets):
        raise HfsError("--onnx and --torchscript name the same file")
    model, cfg, path = load_checkpoint_model(checkpoint, "cpu", output_dir)
    size = cfg.data.image_size
    exported = HalfPrecision(model).eval() if fp16 else model
    metadata = {"hfs.arch": cfg.model.arch, "hfs.image_size": str(size),
                "hfs.embedding_size": str(cfg.model.embedding_size), "hfs.checkpoint": path.name,
                "hfs.precision": "fp16" if fp16 else "fp32",
                "hfs.input": f"float32 (batch, 3, {size}, {size}) RGB in [-1, 1]"}
    result = ExportResult(path, cfg.model.arch, size, cfg.model.embedding_size, fp16)
    builders = {"onnx": onnx_bytes, "torchscript": torchscript_bytes}
    for kind, target in targets.items():
        data = builders[kind](exported, size, metadata)
        result.max_rel_diff[kind] = _check(kind, data, model, size, fp16)
        atomic_write_bytes(target, data)
        result.files[kind] = target
        log.info("wrote %s (%s, %.1f MB)", target, kind, len(data) / 1e6)
    return result


def render_export(result: ExportResult, console) -> None:
    """One line per written file: what it holds and how closely it matches the checkpoint."""
    precision = "fp16" if result.fp16 else "fp32"
    for kind, target in result.files.items():
        what = f"ONNX opset {ONNX_OPSET}" if kind == "onnx" else "TorchScript"
        console.print(f"{target}: {what}, {precision}, {result.arch} backbone (batch, 3, {result.image_size}, "
                      f"{result.image_size}) -> (batch, {result.embedding_size}) from {result.checkpoint}; "
                      f"max relative difference to torch {result.max_rel_diff[kind]:.1e}", soft_wrap=True)
