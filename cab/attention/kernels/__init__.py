"""cab's own Triton kernels, each beside its pure-PyTorch reference.

- `linear.py`: causal linear attention with optional per-head exponential decay, tiled as Lightning
  Attention-2 (quadratic inside a block, a carried state between blocks), and noncausal linear attention
  (K^T V reduction, then Q times the state); forward and backward kernels for both.
- `window.py`: sliding-window (+ sink) exact softmax attention, flash-style (online softmax, key blocks
  outside the window skipped), forward and backward kernels.

BASED's Taylor-feature attention needs no kernel of its own: its feature map is applied before the call
and the causal kernel of `linear.py` (decay off, normaliser on) computes the rest.

The kernels run on CUDA, or on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1` in the
environment before triton is imported), which is how the tests check them without a GPU. The attentions
that use them (`linear_elu`, `sliding_window`) choose a backend with `triton_unavailable_reason`.
`python -m cab.attention.kernels._compile_check` compiles every kernel variant for a GPU target (sm_90 by
default) without a GPU, catching what the interpreter accepts but the compiler would reject.
This is a package, so the attention loader does not import it as a mechanism.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_import_error() -> "str | None":
    """Why triton cannot be imported here (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install is reported, not raised
        return f"triton does not import: {type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: "torch.device | str") -> "str | None":
    """Why cab's Triton kernels cannot run on `device`, or None when they can: CUDA with triton, or any
    CPU tensor under the Triton interpreter."""
    device = torch.device(device)
    missing = triton_import_error()
    if missing:
        return missing
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if interpreting():
            return None
        return ("Triton kernels need a CUDA GPU; on CPU they run only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported)")
    return f"cab's Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}"


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(requested: str, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for `requested` on `device` and `dtype`: "auto" is triton on CUDA when the
    kernels can run there and take the dtype, torch otherwise; an explicit "triton" that cannot run raises
    (it never falls back silently)."""
    if requested == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if requested == "triton":
        if reason:
            raise RuntimeError(f"{name}: backend='triton' cannot run on {device}: {reason}")
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"{name}: backend='triton' takes float16, bfloat16 or float32 inputs, got {dtype} "
                            "(use backend='torch' or 'auto')")
        return "triton"
    if device.type == "cuda" and reason is None and dtype in TRITON_DTYPES:
        return "triton"
    return "torch"


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """The block size covering n (tl.dot needs every dimension >= 16)."""
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))
