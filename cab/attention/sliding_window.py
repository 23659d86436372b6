"""Sliding-window (+ sink) softmax attention with three backends — PyTorch (the blocked `local` computation),
cab's Triton kernel (`cab.attention.kernels.window`) and FlexAttention with the same mask — so a benchmark
can put the three side by side as rows of one attention."""

from __future__ import annotations

from collections import OrderedDict

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.masks import and_masks, padding_mask
from cab.attention.flash import static_batch
from cab.attention.kernels import resolve_backend
from cab.attention.kernels.window import window_attention_reference
from cab.attention.local import LocalAttention
from cab.registry import register_attention

BACKENDS = ("auto", "torch", "triton", "flex")
_CROSS = ("a sliding window needs queries and keys on one position axis; two different sequences share "
          "no positions, so any alignment would be an arbitrary choice rather than local attention")
_BLOCK_MASK_CACHE = 8


class _FlexForwardReferenceBackward(torch.autograd.Function):
    """FlexAttention forward (no CPU backward exists) with the gradient of the dense masked reference."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, window, sinks, causal, key_padding_mask):
        from cab.attention.flash import flex_call

        ctx.save_for_backward(q, k, v)
        ctx.cfg = (window, sinks, causal, key_padding_mask)
        return flex_call(q.detach(), k.detach(), v.detach(), block_mask)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        window, sinks, causal, key_padding_mask = ctx.cfg
        with torch.enable_grad():
            ref = window_attention_reference(q, k, v, window, sinks, causal, key_padding_mask)
            dq, dk, dv = torch.autograd.grad(ref, (q, k, v), dout)
        return dq, dk, dv, None, None, None, None, None


@register_attention(
    "sliding_window", patterns=("NS", "CS"), family="local", exact=False, mechanism="M29",
    citation="Beltagy et al., Longformer: The Long-Document Transformer, arXiv 2020 (sliding window); "
    "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (sinks)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class SlidingWindowAttention(Attention):
    """Softmax attention over a sliding window of half-width `window` (w) plus `sinks` (s) always-visible
    first keys, with `local`'s convention: query at position p sees keys j with |p - j| <= w (NS) or
    p - w <= j <= p (CS), and sink keys j < s (CS: j <= p); padded keys are never seen and a row with no
    visible key outputs 0. CS is bottom-right aligned (query i at position i + Lk - Lq); NS with Lq != Lk
    puts query i at position i. Scores are scaled by 1/sqrt(d).

    Backends (`backend`):
    - "torch": the blocked computation of `local` (query blocks against their key neighbourhood);
    - "triton": cab's flash-style kernel with block skipping (`cab.attention.kernels.window`), forward and
      backward, on CUDA or on CPU under TRITON_INTERPRET=1; float16/bfloat16/float32 inputs;
    - "flex": FlexAttention (torch.compile) with this visibility as its mask_mod and block mask — on CUDA
      with FlexAttention's own backward; on CPU (which has no FlexAttention backward) the gradient is that
      of the dense masked reference, and float64 takes FlexAttention's unfused path;
    - "auto" (default): triton on CUDA for float16/bfloat16/float32 when triton imports, torch otherwise.
    An explicit backend that cannot run on the inputs' device raises. `self.backend` is the backend of the
    latest call (torch before any call with "auto"); the bench records it.

    Defaults w = 15, s = 0 (`local`'s); the GPU benchmark config sets the window it times.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, window: int = 15, sinks: int = 0, backend: str = "auto"):
        super().__init__(pattern, num_heads, head_dim)
        if window < 0 or sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.window, self.sinks = window, sinks
        self.requested_backend = backend
        self.compiles_per_shape = backend == "flex"
        self.backend = "torch" if backend == "auto" else backend
        self._torch = LocalAttention(pattern, num_heads, head_dim, window=window, sinks=sinks)
        self._block_masks: OrderedDict = OrderedDict()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, sinks={self.sinks}, backend={self.requested_backend}"

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Pairs inside the window or the sinks (before padding): the work of every backend, up to tiles.
        Closed form per query row, O(Lq) (the (Lq, Lk) mask would not fit at long lengths)."""
        lq, lk = q.shape[-2], k.shape[-2]
        p = torch.arange(lq, dtype=torch.int64) + (lk - lq if self.causal else 0)
        lo = (p - self.window).clamp_min(0)
        hi = (p if self.causal else p + self.window).clamp_max(lk - 1)
        in_window = (hi - lo + 1).clamp_min(0)
        sink_end = torch.full_like(p, min(self.sinks, lk))  # sinks are keys 0 .. sink_end - 1
        if self.causal:
            sink_end = torch.minimum(sink_end, (p + 1).clamp_min(0))
        overlap = (torch.minimum(hi, sink_end - 1) - lo + 1).clamp_min(0)
        overlap = torch.where(in_window > 0, overlap, torch.zeros_like(overlap))
        return int((in_window + sink_end - overlap).sum()) * q.shape[0] * q.shape[1]

    def _flex_block_mask(self, batch, lq, lk, key_padding_mask, device):
        from torch.nn.attention.flex_attention import create_block_mask

        pad = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
        if pad is not None:
            pad = pad.clone()  # the mask_mod's own copy, its batch kept static (see flash.static_batch)
            static_batch(pad)
        key = (lq, lk, str(device), None if pad is None else (tuple(pad.shape), pad.cpu().numpy().tobytes()))
        if key in self._block_masks:
            self._block_masks.move_to_end(key)
            return self._block_masks[key]
        window = self._torch.mask_fn(lq, lk)
        mask_mod = window if pad is None else and_masks(window, padding_mask(pad))
        block_mask = create_block_mask(mask_mod, None if pad is None else batch, None, lq, lk, device=device)
        self._block_masks[key] = block_mask
        if len(self._block_masks) > _BLOCK_MASK_CACHE:
            self._block_masks.popitem(last=False)
        return block_mask

    def _flex(self, q, k, v, key_padding_mask):
        from cab.attention.flash import FlexAttention, flex_call, in_user_dispatch_mode

        reason = FlexAttention.unavailable_reason(q.device)
        if reason:
            raise RuntimeError(f"sliding_window: backend='flex' cannot run on {q.device}: {reason}")
        block_mask = self._flex_block_mask(q.shape[0], q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if wants_grad and (q.device.type == "cpu" or in_user_dispatch_mode()):
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            return _FlexForwardReferenceBackward.apply(q, k, v, block_mask, self.window, self.sinks, self.causal,
                                                       key_padding_mask)
        if not wants_grad:
            q, k, v = q.detach(), k.detach(), v.detach()
        return flex_call(q, k, v, block_mask)

    def forward(self, q, k, v, key_padding_mask=None):
        if self.requested_backend == "flex":
            self.backend = "flex"
            return self._flex(q, k, v, key_padding_mask).to(q.dtype)
        backend = resolve_backend(self.requested_backend, "sliding_window", q.device, q.dtype)
        self.backend = backend
        if backend == "torch":
            return self._torch(q, k, v, key_padding_mask)
        from cab.attention.kernels.window import window_attention

        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return window_attention(q, k, v, self.window, self.sinks, self.causal, key_padding_mask)

    def reference(self, q, k, v, key_padding_mask=None):
        """Dense softmax over the explicit (Lq, Lk) window-and-sink mask (`window_attention_reference`)."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return window_attention_reference(q, k, v, self.window, self.sinks, self.causal, key_padding_mask)
