"""Public linear-attention kernels as comparison rows: flash-linear-attention's (fla) `chunk_linear_attn`
and `fused_recurrent_linear_attn`, wrapped with `linear_elu`'s math so that they time the same attention
as cab's own kernel. (FlashAttention is `flash`, FlexAttention `flex`, in cab/attention/flash.py.)"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Callable

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import elu_feature_map
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

_NONCAUSAL = ("fla's linear_attn operators are causal (prefix-state) kernels; the noncausal product "
              "phi(Q) (phi(K)^T V) is one matmul pair and is timed as linear_elu")
_UNSUPPORTED = {"NS": _NONCAUSAL, "NC": _NONCAUSAL,
                "CC": "fla's operators take one sequence for queries and keys (causal self attention only)"}
_FLA_OPS = {"chunk": "chunk_linear_attn", "fused_recurrent": "fused_recurrent_linear_attn"}
_CITATION = ("Yang and Zhang, FLA: A Triton-Based Library for Hardware-Efficient Implementations of Linear "
             "Attention Mechanism (flash-linear-attention), 2024; Katharopoulos et al., Transformers are "
             "RNNs, ICML 2020")


@functools.cache
def fla_operator(kind: str) -> Callable:
    """fla.ops.linear_attn.<chunk|fused_recurrent>_linear_attn of the installed package."""
    module = importlib.import_module("fla.ops.linear_attn")
    return getattr(module, _FLA_OPS[kind])


def fla_unavailable_reason(device) -> "str | None":
    device = torch.device(device)
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if device.type != "cuda":
        return f"fla's Triton kernels run only on CUDA GPUs here (device is {device.type})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        fla_operator("chunk")
        fla_operator("fused_recurrent")
    except Exception as exc:
        return f"fla.ops.linear_attn does not import: {type(exc).__name__}: {exc}"
    return None


class _FlaLinear(Attention):
    """Causal linear attention with phi = elu + 1 (`linear_elu`'s math, CS only) computed by an fla
    operator: the features are applied here (padded keys zeroed, bottom-right alignment when Lq != Lk),
    fla computes the numerator sum_{j<=i} phi(q_i).phi(k_j) v_j in its [B, T, H, D] layout with scale 1
    and normalize=False, and the normaliser phi(q_i).sum_{j<=i} phi(k_j) is a cumulative sum in PyTorch —
    what fla's own `normalize=True` does, minus its 1e-5 added to the denominator (kept out so the row
    matches the exact reference). Runs on CUDA only, with fla installed."""

    complexity = {"time": 1, "memory": 1}
    fla_kind: str = ""
    backend = "fla"

    @classmethod
    def unavailable_reason(cls, device) -> "str | None":
        return fla_unavailable_reason(device)

    def forward(self, q, k, v, key_padding_mask=None):
        reason = self.unavailable_reason(q.device)
        if reason:
            raise RuntimeError(f"{self.name}: {reason}")
        op = fla_operator(self.fla_kind)
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask, q.dtype)
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.to(device=k.device, dtype=torch.bool)[:, None, :, None], 0.0)
        kwargs = dict(scale=1.0, normalize=False)
        if "head_first" in inspect.signature(op).parameters:
            kwargs["head_first"] = False
        num, _ = op(phi_q.transpose(1, 2), phi_k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        work = compute_dtype(out_dtype)
        num = num.transpose(1, 2).to(work)
        den = (phi_q.to(work) * phi_k.to(work).cumsum(dim=-2)).sum(dim=-1, keepdim=True)
        out = num / nonzero(den)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit causal weights phi(q_i).phi(k_j), j <= i (bottom-right), padding masked, row-normalised."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        weights = elu_feature_map(q) @ elu_feature_map(k).transpose(-1, -2)
        weights = weights * attention_mask(Pattern.CS, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        den = weights.sum(dim=-1, keepdim=True)
        return (weights @ v) / nonzero(den)


@register_attention("fla_chunk_linear", patterns=("CS",), family="linear", exact=False, citation=_CITATION,
                    unsupported=_UNSUPPORTED)
class FlaChunkLinear(_FlaLinear):
    __doc__ = _FlaLinear.__doc__ + " Operator: fla.ops.linear_attn.chunk_linear_attn (chunked, tensor cores)."
    fla_kind = "chunk"


@register_attention("fla_fused_recurrent", patterns=("CS",), family="linear", exact=False, citation=_CITATION,
                    unsupported=_UNSUPPORTED)
class FlaFusedRecurrentLinear(_FlaLinear):
    __doc__ = (_FlaLinear.__doc__ + " Operator: fla.ops.linear_attn.fused_recurrent_linear_attn (one "
               "token at a time, state in registers).")
    fla_kind = "fused_recurrent"
