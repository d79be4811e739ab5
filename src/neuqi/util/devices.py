"""The device a command runs on, from its ``--device`` option."""

from __future__ import annotations

import torch

from neuqi.util.errors import UserError


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device of this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available; use --device cpu")
    return torch.device(device)
