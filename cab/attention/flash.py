"""Fused exact attention from outside cab: `flash` (the flash-attn package's FlashAttention-2 kernels, CUDA
only) and `flex` (PyTorch's FlexAttention, compiled by torch.compile, with mask_mods for the patterns)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import shutil
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.functional import softmax_scale
from cab.patterns import Pattern
from cab.registry import register_attention

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

ALL_PATTERNS = ("NS", "CS", "NC", "CC")
HALF_DTYPES = (torch.float16, torch.bfloat16)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# flash-attn ---------------------------------------------------------------------------------------------

def flash_kernels() -> "tuple[Callable, Callable]":
    """(flash_attn_func, flash_attn_varlen_func) of the installed flash-attn package."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def _cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts [0, n0, n0 + n1, ...] as int32, flash-attn's varlen convention."""
    return F.pad(torch.cumsum(counts, dim=0, dtype=torch.int32), (1, 0))


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None",
                  causal: bool, dense_fn: Callable, varlen_fn: Callable) -> torch.Tensor:
    """Exact attention through flash-attn's calling convention: (B, L, H, D) tensors, grouped-query heads
    native, causal aligned bottom-right. Key padding goes through the varlen kernel: the real keys (and,
    for causal self attention, the real query rows) are packed, so padded keys never enter a softmax."""
    b, hq, lq, _ = q.shape
    lk = k.shape[-2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if key_padding_mask is None:
        return dense_fn(qt, kt, vt, causal=causal).transpose(1, 2)
    real_k = ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    key_counts = real_k.sum(dim=1)
    real_q = (key_counts > 0)[:, None].expand(b, lq)
    if causal:  # query i sits at key position i + Lk - Lq; a padded position is a padded query
        position = torch.arange(lq, device=q.device) + lk - lq
        real_q = real_q & (position >= 0) & real_k[:, position.clamp_min(0)]
    out = q.new_zeros(b * lq, hq, v.shape[-1])
    if not bool(real_q.any()):
        return out.view(b, lq, hq, -1).transpose(1, 2)
    k_rows = torch.nonzero(real_k.flatten()).flatten()
    q_rows = torch.nonzero(real_q.flatten()).flatten()
    query_counts = real_q.sum(dim=1)
    packed = varlen_fn(
        qt.reshape(b * lq, hq, -1).index_select(0, q_rows),
        kt.reshape(b * lk, kt.shape[2], -1).index_select(0, k_rows),
        vt.reshape(b * lk, vt.shape[2], -1).index_select(0, k_rows),
        _cu_seqlens(query_counts), _cu_seqlens(key_counts), int(query_counts.max()), int(key_counts.max()),
        causal=causal,
    )
    return out.index_copy(0, q_rows, packed).view(b, lq, hq, -1).transpose(1, 2)


@register_attention(
    "flash", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M2",
    citation="Dao, FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning, ICLR 2024 "
    "(flash-attn package)",
)
class FlashAttention(Attention):
    """Exact attention by the flash-attn package's kernels (`flash_attn_func`, `flash_attn_varlen_func`).

    Available only on a CUDA GPU of compute capability >= 8.0 with flash-attn installed;
    `unavailable_reason` says which is missing. The kernels take float16/bfloat16: other inputs are cast
    to `compute_dtype` and the output back (so float32 numbers carry the kernel's half-precision error,
    which the fidelity report shows). Causal self attention uses the kernel's causal flag, which is
    bottom-right aligned like cab's CS; CC needs no mask (each query row is independent); key padding packs
    the real keys into the varlen kernel. Under CS with padding the rows at padded query positions are
    zero (they are packed out), where eager attention would give them the attention over the real keys
    before them. CAB's FlashAttention wrapper could not be constructed; this one is built from
    (pattern, heads, head_dim) like every attention.
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, compute_dtype: str = "bfloat16"):
        super().__init__(pattern, num_heads, head_dim)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype

    @classmethod
    def unavailable_reason(cls, device) -> "str | None":
        device = torch.device(device)
        if device.type != "cuda":
            return f"flash-attn kernels run only on CUDA GPUs (device is {device.type})"
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed (pip install flash-attn)"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"flash-attn 2 needs compute capability >= 8.0 (Ampere or newer), this GPU is {major}.{minor}"
        return None

    def forward(self, q, k, v, key_padding_mask=None):
        reason = self.unavailable_reason(q.device)
        if reason:
            raise RuntimeError(f"flash: {reason}")
        dense_fn, varlen_fn = flash_kernels()
        work = q.dtype if q.dtype in HALF_DTYPES else COMPUTE_DTYPES[self.compute_dtype]
        out = flash_forward(q.to(work), k.to(work), v.to(work), key_padding_mask, self.pattern is Pattern.CS,
                            dense_fn, varlen_fn)
        return out.to(q.dtype)


# FlexAttention ----------------------------------------------------------------------------------------------

FLEX_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels take
_BLOCK_MASK_CACHE = 8
# FlexAttention compiles one graph per shape family, mask_mod, head layout and dtype; past dynamo's default
# limit (8) it would silently run the unfused path, which a sweep must never time as FlexAttention.
FLEX_RECOMPILE_LIMIT = 256


@functools.cache
def _compiled_flex() -> Callable:
    """flex_attention under torch.compile, built once per process (compilation happens on first call)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def in_user_dispatch_mode() -> bool:
    """Whether a Python TorchDispatchMode of the caller's (not one of torch's own) is active."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return is_in_torch_dispatch_mode(include_infra_modes=False)


def _outside_user_dispatch_modes():
    """Step out of the caller's TorchDispatchModes (e.g. conformance's NaN poisoning of torch.empty):
    torch.compile refuses to run under one, and a compiled kernel's own allocations are invisible to such
    a mode anyway. The modes are back in place when the context exits."""
    if not in_user_dispatch_mode():
        return contextlib.nullcontext()
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: "BlockMask | None") -> torch.Tensor:
    """One FlexAttention forward: the compiled fused kernel, or FlexAttention's own unfused path for
    float64 (its compiled kernels take float32/16 only). Inputs must not require grad on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    with _outside_user_dispatch_modes():
        if q.dtype in FLEX_KERNEL_DTYPES:
            with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
                return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def exact_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, pattern: Pattern,
    key_padding_mask: "torch.Tensor | None", rows_per_chunk: int = 0,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """(dq, dk, dv) of softmax(q k^T / sqrt(d) + mask) v from the saved output, one query chunk at a time
    (FlashAttention-2's backward: P recomputed, dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)),
    dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)); memory O(chunk * Lk). Rows that see no key get P = 0."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[-2]
    kr, vr = repeat_kv(k, hq), repeat_kv(v, hq)
    scale = softmax_scale(d)
    chunk = rows_per_chunk or max(1, (1 << 24) // max(1, b * hq * lk))
    delta = (dout * out).sum(dim=-1, keepdim=True)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(kr), torch.zeros_like(vr)
    pad = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.bool)
    columns = torch.arange(lk, device=q.device)
    for start in range(0, lq, chunk):
        stop = min(lq, start + chunk)
        q_c, do_c = q[..., start:stop, :], dout[..., start:stop, :]
        keep = torch.ones(stop - start, lk, dtype=torch.bool, device=q.device)
        if pattern is Pattern.CS:
            keep = columns[None, :] <= (torch.arange(start, stop, device=q.device) + lk - lq)[:, None]
        keep = keep[None, None] if pad is None else keep[None, None] & ~pad[:, None, None, :]
        scores = ((q_c @ kr.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse.masked_fill(~torch.isfinite(lse), 0.0))
        dv += probs.transpose(-1, -2) @ do_c
        grad_scores = probs * (do_c @ vr.transpose(-1, -2) - delta[..., start:stop, :])
        dq[..., start:stop, :] = (grad_scores @ kr) * scale
        dk += (grad_scores.transpose(-1, -2) @ q_c) * scale
    group = hq // hkv
    return dq, dk.view(b, hkv, group, lk, d).sum(2), dv.view(b, hkv, group, lk, -1).sum(2)


class _FlexWithTorchBackward(torch.autograd.Function):
    """FlexAttention forward (no grad: it has no CPU backward) with the chunked PyTorch backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, key_padding_mask, pattern):
        out = flex_call(q.detach(), k.detach(), v.detach(), block_mask)
        ctx.save_for_backward(q, k, v, out)
        ctx.key_padding_mask, ctx.pattern = key_padding_mask, pattern
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = exact_attention_backward(q, k, v, out, dout, ctx.pattern, ctx.key_padding_mask)
        return dq, dk, dv, None, None, None


@register_attention(
    "flex", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M2",
    citation="Dong et al., Flex Attention: A Programming Model for Generating Optimized Attention Kernels, "
    "arXiv 2412.05496 (2024) (torch.nn.attention.flex_attention)",
)
class FlexAttention(Attention):
    """Exact attention through FlexAttention compiled by torch.compile, the patterns and the key padding
    expressed as one mask_mod: visible(b, h, i, j) = not pad[b, j] and (not causal or j <= i + Lk - Lq)
    (CS bottom-right aligned); NS/NC/CC without padding pass no block mask at all. Block masks are built
    once per (shape, padding) and cached (up to 8), so repeated calls time only the attention; the first
    call of a shape compiles (seconds). Rows that see no key output zero.

    Backward: on CUDA FlexAttention's own compiled backward. On CPU FlexAttention has no backward (it
    refuses inputs that require grad), so when a gradient is needed the forward still runs FlexAttention
    (on detached inputs) and the backward is cab's chunked PyTorch implementation of FlashAttention-2's
    backward (`exact_attention_backward`): the gradients are exact, but a CPU backward timing measures that
    fallback, not a FlexAttention kernel. The same fallback serves CUDA when a Python TorchDispatchMode of
    the caller's is active: torch.compile cannot run under one, so the FlexAttention call itself steps
    outside such modes (its kernel's allocations are invisible to them anyway). float64 runs
    FlexAttention's unfused path (its compiled kernels take float32/16 only).
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)
        self._block_masks: OrderedDict = OrderedDict()

    @classmethod
    def unavailable_reason(cls, device) -> "str | None":
        device = torch.device(device)
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no FlexAttention (torch >= 2.5 needed)"
        if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            return "torch.compile on CPU needs a C++ compiler and none is on PATH"
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
        if device.type not in ("cpu", "cuda"):
            return f"FlexAttention runs on cpu and cuda, not {device.type}"
        return None

    def block_mask(self, batch: int, lq: int, lk: int, key_padding_mask: "torch.Tensor | None",
                   device: "torch.device | str") -> "BlockMask | None":
        """The cached BlockMask for this shape and padding (None when every key is visible to every row)."""
        causal = self.pattern is Pattern.CS
        if key_padding_mask is None and not causal:
            return None
        pad = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
        key = (lq, lk, str(device), None if pad is None else (tuple(pad.shape), pad.cpu().numpy().tobytes()))
        if key in self._block_masks:
            self._block_masks.move_to_end(key)
            return self._block_masks[key]
        from torch.nn.attention.flex_attention import create_block_mask

        offset = lk - lq
        if pad is None:
            def mask_mod(b, h, i, j):
                return j <= i + offset
        elif causal:
            def mask_mod(b, h, i, j):
                return ~pad[b, j] & (j <= i + offset)
        else:
            def mask_mod(b, h, i, j):
                return ~pad[b, j]
        block_mask = create_block_mask(mask_mod, None if pad is None else batch, None, lq, lk, device=device)
        self._block_masks[key] = block_mask
        if len(self._block_masks) > _BLOCK_MASK_CACHE:
            self._block_masks.popitem(last=False)
        return block_mask

    def forward(self, q, k, v, key_padding_mask=None):
        block_mask = self.block_mask(q.shape[0], q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if wants_grad and (q.device.type == "cpu" or in_user_dispatch_mode()):
            return _FlexWithTorchBackward.apply(q, k, v, block_mask, key_padding_mask, self.pattern)
        if not wants_grad:  # FlexAttention refuses CPU inputs that require grad even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        return flex_call(q, k, v, block_mask)
