"""Checkpoints: one consistent unit of backbone, classifier, optimizer, RNG, data position.

A checkpoint is one file ``<output_dir>/checkpoints/step-<N>.pt`` written atomically
(temp + rename). In sampled mode the classifier rows and their momentum live in the weight
store, so the store is snapshotted first under the tag ``step-<N>`` and the checkpoint
records that tag; a checkpoint is only ever written after its snapshot is complete. The lr
schedule is a pure function of (config, step), so no scheduler state is needed. Everything
is stored in types ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import io
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfs.utils.atomic import atomic_write_bytes
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

FORMAT = "hfs-checkpoint-1"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step-{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp files never match the name)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | Path, flag: str = "--resume") -> Path:
    """``latest`` (in output_dir), a run folder (its latest), or a checkpoint file.

    ``flag`` is the option the spec came from, named in the error when ``latest`` finds nothing.
    """
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise HfsError(f"{flag} latest: no checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(spec)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path.parent)
        if not found:
            raise HfsError(f"no checkpoint in {path} (expected checkpoints/step-N.pt)")
        return found[-1]
    if not path.is_file():
        raise HfsError(f"checkpoint {path} does not exist")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states in weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- save / load


def save_checkpoint(output_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` (atomically) and keep the newest ``keep``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "step": step, **payload}, buf)
    path = checkpoint_path(output_dir, step)
    atomic_write_bytes(path, buf.getvalue())
    prune_checkpoints(output_dir, keep)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's dict. ``mmap=True`` maps the tensors instead of reading them: cheap when
    only the small entries (config, step) are wanted from a multi-GB file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise HfsError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise HfsError(f"checkpoint {path} is not a readable hfs checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HfsError(f"checkpoint {path} is not an hfs checkpoint (format {FORMAT} expected)")
    return ckpt
