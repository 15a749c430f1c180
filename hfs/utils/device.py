"""The one rule for turning a device setting (auto, cpu, cuda, cuda:N) into a torch.device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfs.utils.errors import HfsError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: "str | torch.device | None" = "auto", source: str = "device") -> "torch.device":
    """``auto``/None -> CUDA when available, else CPU; errors name ``source`` (a key or flag)."""
    import torch

    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise HfsError(f"{source}: unknown device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HfsError(f"{source} is '{spec}' but CUDA is not available (use cpu or auto)")
    return device
