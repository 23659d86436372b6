"""Which devices cab can run on in this process."""

from __future__ import annotations

import torch


def device_unavailable(device: str) -> "str | None":
    """Why `device` cannot be used here ("CUDA is not available on this machine"), or None when it can."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"device {device!r} is not a torch device"
    if kind == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    if kind not in ("cpu", "cuda"):
        return f"device {device!r} is not supported (cab runs on cpu and cuda)"
    return None
