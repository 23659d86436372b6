"""Fused exact attention from outside cab: `flash` (the flash-attn package's FlashAttention-2 kernels, CUDA
only) and `flex` (PyTorch's FlexAttention, compiled by torch.compile, with mask_mods for the patterns)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.masks import and_masks, diagonal_mask, padding_mask
from cab.attention.engine.prepare import softmax_scale
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
def _compiled_flex(dynamic: "bool | None" = None) -> Callable:
    """flex_attention under torch.compile, built once per process (compilation happens on first call).
    `dynamic=None` is torch's default (a shape seen to change compiles once with symbolic sizes);
    `dynamic=False` compiles every shape on its own (see `_compile_failed`)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def _compile_failed(exc: BaseException) -> bool:
    """Whether `exc` is inductor failing to compile the kernel it generated. On CPU the C++ it emits for
    symbolic sizes does not always compile (seen at 8 heads, head dim 128, after other shapes); the same
    shape compiled statically does."""
    return type(exc).__name__ in ("InductorError", "CppCompileError", "BackendCompilerFailed") and \
        "compile" in str(exc).lower()


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


# The CPU kernel's micro-GEMM for q k^T (inductor's CppMicroGemmFP32Vec with GemmBlocking(1, 16, 1), torch
# 2.5 to at least 2.13) walks a key block 16 columns at a time; for the last, narrower group of columns it
# takes its "transpose first" implementation whenever the width and the head dim are multiples of the float
# vector width and the head dim is below 24, and that implementation computes and stores all 16 columns.
# With 16 float lanes (AVX-512) a group narrower than 16 is never a multiple of 16, so nothing happens; with
# 8 lanes (AVX2, or inductor's cpp.simdlen=256) a key block whose length is 8 (mod 16), with head dim 8 or
# 16, makes it read 8 keys past the block (past the tensor at its end: garbage, NaN) and write 8 scores past
# the row, the last row's landing on the running row maxima: wrong rows, zero rows or NaN, varying run to
# run. The q k^T product does not change when q and k gain zero columns, so such calls pad the head dim of
# q and k to 24 (the kernel's other, correct implementation) and pass the original 1/sqrt(d) scale.
_MICRO_GEMM_BLOCK_N = 16
_MICRO_GEMM_SAFE_QK_DIM = 24
_DEFAULT_FLEX_BLOCK = 128  # FlexAttention's block size when no block mask is given


def cpu_flex_unsupported_reason() -> "str | None":
    """Why inductor cannot compile FlexAttention for this CPU (its own test: AVX2, not macOS), or None."""
    if sys.platform == "darwin":
        return "FlexAttention's compiled CPU kernel is not supported on macOS"
    if not getattr(torch.cpu, "_is_avx2_supported", lambda: False)():
        return "FlexAttention's compiled CPU kernel needs an x86 CPU with AVX2, which this CPU lacks"
    if os.getenv("ATEN_CPU_CAPABILITY") == "default":
        return "FlexAttention's compiled CPU kernel needs AVX2, and ATEN_CPU_CAPABILITY=default turns it off"
    return None


def _cpu_float_lanes() -> int:
    """Floats per vector in the code inductor generates for this CPU now (0 if it vectorises nothing); it
    follows ATEN_CPU_CAPABILITY and inductor's cpp.simdlen, so the answer is cached per their values."""
    from torch._inductor import config

    return _float_lanes(config.cpp.simdlen, os.getenv("ATEN_CPU_CAPABILITY"))


@functools.cache
def _float_lanes(simdlen: "int | None", capability: "str | None") -> int:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return int(isa.nelements(torch.float)) if isa else 0


def cpu_flex_qk_dim(head_dim: int, lk: int, kv_block: int = _DEFAULT_FLEX_BLOCK) -> int:
    """The head dim the compiled CPU kernel must see for q and k so that its q k^T micro-GEMM is correct:
    `head_dim` itself, or 24 where a key block of `lk` keys cut at `kv_block` hits the micro-GEMM bug above."""
    if head_dim >= _MICRO_GEMM_SAFE_QK_DIM or lk < 1:
        return head_dim
    lanes = _cpu_float_lanes()
    if not lanes or lanes >= _MICRO_GEMM_BLOCK_N or head_dim % lanes:
        return head_dim
    split = min(kv_block, lk)
    widths = (split % _MICRO_GEMM_BLOCK_N, ((lk - 1) % split + 1) % _MICRO_GEMM_BLOCK_N)  # full block, last block
    if any(w and w % lanes == 0 for w in widths):
        return _MICRO_GEMM_SAFE_QK_DIM
    return head_dim


def flex_variant(q: torch.Tensor, k: torch.Tensor, block_mask: "BlockMask | None") -> str:
    """What `flex_call` runs for these inputs, as a backend label: "flex" (the compiled fused kernel),
    "flex-qkpad24" (the same kernel on q and k zero-padded to head dim 24, see above) or "flex-unfused"
    (FlexAttention's unfused path, for float64)."""
    if q.dtype not in FLEX_KERNEL_DTYPES:
        return "flex-unfused"
    if q.device.type == "cpu" and _flex_qk_dim(q, k, block_mask) != q.shape[-1]:
        return f"flex-qkpad{_MICRO_GEMM_SAFE_QK_DIM}"
    return "flex"


def _flex_qk_dim(q: torch.Tensor, k: torch.Tensor, block_mask: "BlockMask | None") -> int:
    """`cpu_flex_qk_dim` for these inputs and block mask (whose key block size cuts the keys)."""
    kv_block = _DEFAULT_FLEX_BLOCK if block_mask is None else int(block_mask.BLOCK_SIZE[1])
    return cpu_flex_qk_dim(q.shape[-1], k.shape[-2], kv_block)


# A per-batch block mask (key padding) with a batch size that varies between calls makes dynamo compile the
# CPU kernel with a symbolic batch, and inductor (torch 2.13) then emits C++ that does not compile
# ("cur_qSplitSize8 was not declared"). Such calls keep the batch static: each batch size compiles its own
# kernel (lengths still go symbolic after the first change, which compiles fine).
def static_batch(*tensors: torch.Tensor) -> None:
    """Mark dim 0 of each tensor static for torch.compile (see above)."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim():
            torch._dynamo.mark_static(tensor, 0)


def block_mask_tensors(block_mask: "BlockMask") -> "list[torch.Tensor]":
    """The tensors of a BlockMask that carry its batch dimension."""
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
             "full_q_num_blocks", "full_q_indices")
    return [t for t in (getattr(block_mask, n, None) for n in names) if isinstance(t, torch.Tensor)]


def _grad_mode_for(*tensors: torch.Tensor):
    """No grad unless an input requires it: a compiled graph is specialised on the grad mode, so a forward on
    inputs without grad (every CPU call, see flex_call) would otherwise compile twice, with grad enabled and
    under no_grad, for the same kernel."""
    return contextlib.nullcontext() if any(t.requires_grad for t in tensors) else torch.no_grad()


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: "BlockMask | None") -> torch.Tensor:
    """One FlexAttention forward: the compiled fused kernel, or FlexAttention's own unfused path for
    float64 (its compiled kernels take float32/16 only). Inputs must not require grad on CPU. On CPU,
    where the kernel's q k^T micro-GEMM would go wrong (`cpu_flex_qk_dim`), q and k are zero-padded in the
    head dim first (`flex_variant` names what runs); a CPU the kernel cannot be compiled for raises."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    with _outside_user_dispatch_modes():
        if q.dtype in FLEX_KERNEL_DTYPES:
            scale = None
            if q.device.type == "cpu":
                reason = cpu_flex_unsupported_reason()
                if reason:
                    raise RuntimeError(f"flex: {reason}")
                qk_dim = _flex_qk_dim(q, k, block_mask)
                if qk_dim != q.shape[-1]:
                    scale = softmax_scale(q.shape[-1])
                    q, k = (F.pad(t, (0, qk_dim - t.shape[-1])) for t in (q, k))
            if q.device.type == "cpu" and block_mask is not None and block_mask.kv_num_blocks.shape[0] > 1:
                static_batch(q, k, v, *block_mask_tensors(block_mask))
            with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT), _grad_mode_for(q, k, v):
                try:
                    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
                except Exception as exc:
                    if not _compile_failed(exc):
                        raise
                    return _compiled_flex(False)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
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
    expressed as one mask_mod whose pattern is data: visible(b, h, i, j) = j <= i + offset and not pad[b, j],
    with offset a tensor, Lk - Lq under CS (bottom-right aligned) and Lk otherwise (every key visible). Every
    call passes a block mask (see `block_mask`), so the four patterns compile the same kernels for a shape.
    Block masks are built once per (shape, padding) and cached (up to 8), so repeated calls time only the
    attention; the first call of a shape compiles (seconds). Rows that see no key output zero.

    Backward: on CUDA FlexAttention's own compiled backward. On CPU FlexAttention has no backward (it
    refuses inputs that require grad), so when a gradient is needed the forward still runs FlexAttention
    (on detached inputs) and the backward is cab's chunked PyTorch implementation of FlashAttention-2's
    backward (`exact_attention_backward`): the gradients are exact, but a CPU backward timing measures that
    fallback, not a FlexAttention kernel. The same fallback serves CUDA when a Python TorchDispatchMode of
    the caller's is active: torch.compile cannot run under one, so the FlexAttention call itself steps
    outside such modes (its kernel's allocations are invisible to them anyway). float64 runs
    FlexAttention's unfused path (its compiled kernels take float32/16 only).

    On CPU the compiled kernel's q k^T micro-GEMM is wrong (garbage, zero or NaN rows, varying run to run)
    when inductor vectorises with 8 floats (AVX2) and a key block is 8 (mod 16) long with head dim 8 or 16;
    those calls zero-pad q and k to head dim 24, which leaves q k^T unchanged and takes the kernel's correct
    implementation (see `cpu_flex_qk_dim`). `backend` records what the latest forward ran: "flex",
    "flex-qkpad24" (that padding) or "flex-unfused" (float64). A CPU inductor cannot compile the kernel for
    (no AVX2) is refused with the reason, by `unavailable_reason` and by the call.
    """

    complexity = {"time": 2, "memory": 1}
    compiles_per_shape = True
    # what the latest forward ran (`flex_variant`): "flex", "flex-qkpad24" or "flex-unfused"
    backend = "flex"

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
        if device.type == "cpu" and cpu_flex_unsupported_reason():
            return cpu_flex_unsupported_reason()
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
        if device.type not in ("cpu", "cuda"):
            return f"FlexAttention runs on cpu and cuda, not {device.type}"
        return None

    def block_mask(self, batch: int, lq: int, lk: int, key_padding_mask: "torch.Tensor | None",
                   device: "torch.device | str") -> "BlockMask":
        """The cached BlockMask for this shape and padding. Its mask_mod reads the pattern from a tensor
        (`offset`) instead of a Python int: torch.compile lifts the tensors a mask_mod reads into kernel
        inputs, so NS, CS, NC and CC share one kernel per shape, and a grid's later patterns reuse the kernels
        its first one compiled (an int offset would be baked into a kernel of each pattern). Under NS, NC and
        CC without padding every block is full, so the kernel never evaluates the mask_mod; passing this mask
        instead of none is also 10-18% faster on CPU (B=1, H=4, D=64, L=256 and 1,024, 2 threads), where
        no mask runs the whole key range as one block. The cache key holds everything the mask depends on:
        the batch size (a padding mask is per batch element; without padding the mask broadcasts over the
        batch), Lq, Lk, the device and the padding itself (its bytes)."""
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, lk):
            raise ValueError(f"flex: key_padding_mask must have shape (batch, Lk) = ({batch}, {lk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        device = torch.device(device)
        pad = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
        key = (None if pad is None else batch, lq, lk, str(device),
               None if pad is None else pad.cpu().numpy().tobytes())
        if key in self._block_masks:
            self._block_masks.move_to_end(key)
            return self._block_masks[key]
        from torch.nn.attention.flex_attention import create_block_mask

        offset = torch.tensor(lk - lq if self.pattern is Pattern.CS else lk, device=device)
        mask_mod = diagonal_mask(offset)
        if pad is not None:
            pad = pad.clone()  # the mask_mod's own copy, its batch kept static (see static_batch)
            static_batch(pad)
            mask_mod = and_masks(padding_mask(pad), mask_mod)
        block_mask = create_block_mask(mask_mod, None if pad is None else batch, None, lq, lk, device=device)
        self._block_masks[key] = block_mask
        if len(self._block_masks) > _BLOCK_MASK_CACHE:
            self._block_masks.popitem(last=False)
        return block_mask

    def forward(self, q, k, v, key_padding_mask=None):
        block_mask = self.block_mask(q.shape[0], q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        self.backend = flex_variant(q, k, block_mask)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if wants_grad and (q.device.type == "cpu" or in_user_dispatch_mode()):
            return _FlexWithTorchBackward.apply(q, k, v, block_mask, key_padding_mask, self.pattern)
        if not wants_grad:  # FlexAttention refuses CPU inputs that require grad even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        return flex_call(q, k, v, block_mask)
