"""An exported ``.onnx`` backbone run by onnxruntime (CPU provider) behind the torch module interface.

``hfs extract`` and ``hfs verify`` take an ``.onnx`` file wherever they take a checkpoint, so
the model that is deployed is scored by the same code as the one that was trained:
:class:`OnnxBackbone` is an ``nn.Module`` without parameters whose forward pass hands the
batch to an onnxruntime session, so :func:`hfs.eval.extract.extract_features` (eval mode,
flip test, batching) needs no branch for it. Any ONNX model with one (B, 3, H, W) image input
and one (B, D) output is accepted (InsightFace's released ones take the same [-1, 1] RGB input).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hfs.utils.errors import HfsError
from hfs.utils.optional import install_hint, require

log = logging.getLogger(__name__)

ONNX_INSTALL_HINT = install_hint("onnx onnxruntime onnxscript", "onnx")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def is_onnx_path(path: str | Path) -> bool:
    """Whether a --checkpoint value names an exported ONNX model rather than an hfs checkpoint."""
    return Path(path).suffix.lower() == ".onnx"


def require_onnxruntime(needed_by: str):
    """onnxruntime (the ``onnx`` extra), or a one-line error saying how to install it."""
    return require("onnxruntime", needed_by, ONNX_INSTALL_HINT)


def open_session(model: str | Path | bytes, source: str):
    """An onnxruntime CPU session over a model file (or its bytes); errors name ``source``."""
    ort = require_onnxruntime(source)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the per-node fallback notes are not for users
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for every kind of bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HfsError(f"{source} is not a model onnxruntime can load ({first})") from None


class OnnxBackbone(nn.Module):
    """(B, 3, H, W) float images -> (B, D) float32 embeddings through an onnxruntime session.

    The batch leaves torch as numpy (on the CPU) and the result comes back on the input's device,
    so callers that move batches to a device keep working. The model has no parameters: it is
    always in inference mode, and ``train()``/``eval()`` only flip the flag.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = open_session(self.path, str(self.path))
        self.input_name, self.input_dtype, self.image_size = self._image_input()
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def _image_input(self) -> tuple[str, type, int]:
        """Name, numpy dtype and square side of the model's one image input; the shape is checked here
        so a wrong model fails before any image is decoded."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise HfsError(f"{self.path}: expected an embedding model with one image input, found inputs "
                           f"{[i.name for i in inputs]}")
        inp = inputs[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise HfsError(f"{self.path}: input '{inp.name}' has shape {shape}; expected (batch, 3, S, S) "
                           "with a fixed square size S")
        if inp.type not in _NUMPY_TYPES:
            raise HfsError(f"{self.path}: input '{inp.name}' is {inp.type}; expected a float tensor")
        return inp.name, _NUMPY_TYPES[inp.type], shape[2]

    def describe(self) -> dict[str, object]:
        """What the file says about itself (written by ``hfs export``), for the features' JSON."""
        meta: dict[str, object] = {"format": "onnx", "image_size": self.image_size}
        if "hfs.arch" in self.metadata:
            meta["arch"] = self.metadata["hfs.arch"]
        return meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu").numpy().astype(self.input_dtype, copy=False)
        out = self.session.run(None, {self.input_name: batch})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
