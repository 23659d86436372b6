"""The attention contract: `cab.Attention`, the base class every built-in and plugin attention extends."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from cab.patterns import Pattern, attention_mask, validate_segment_ids


class UnsupportedPattern(ValueError):
    """Raised when an attention is built for a pattern it does not declare."""

    def __init__(self, attention: str, pattern: Pattern, supported: "tuple[Pattern, ...]", reason: str = ""):
        self.attention, self.pattern, self.supported = attention, pattern, tuple(supported)
        names = ", ".join(p.value for p in supported) or "none"
        why = f": {reason}" if reason else ""
        super().__init__(
            f"attention {attention!r} does not support pattern {pattern.value} ({pattern.long_name}){why}; "
            f"it supports: {names}"
        )


class Attention(nn.Module):
    """Base class of every attention.

    Inputs follow `scaled_dot_product_attention`: q (B, Hq, Lq, Dk), k (B, Hkv, Lk, Dk),
    v (B, Hkv, Lk, Dv) with Hq a multiple of Hkv; key_padding_mask (B, Lk) bool, True = padding.
    Output (B, Hq, Lq, Dv). The pattern is fixed at construction. Class-level metadata (name, family,
    patterns, exact, citation, ...) is set by `cab.register_attention`.

    Segments (packed variable-length sequences): an attention that sets `supports_segments = True` also
    accepts the keyword `segment_ids`, (B, L) integers, for the self patterns with Lq == Lk == L: a query
    then attends only the keys of its own segment (a maximal run of equal consecutive ids,
    `cab.patterns.segment_runs`), on top of the pattern and the padding; the output equals running each
    segment alone. Callers (the harness, the conformance check `segments`) pass `segment_ids` only to
    attentions declaring support, so every other attention keeps the plain forward(q, k, v,
    key_padding_mask=None) signature. Incremental decoding knows no segments (one sequence per row).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    patterns: ClassVar[tuple[Pattern, ...]] = ()
    exact: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    supports_gqa: ClassVar[bool] = True
    mechanism: ClassVar[str] = ""
    # why each undeclared pattern is unsupported, shown in errors and the support matrix
    unsupported_reasons: ClassVar[dict[Pattern, str]] = {}
    # theoretical cost exponents in the sequence length, e.g. {"time": 2, "memory": 1}; optional, shown by
    # cab.analysis beside the fitted exponents (a family default is used where an attention declares none)
    complexity: ClassVar[dict[str, float]] = {}
    # whether forward accepts segment_ids (packed variable-length self attention, see the class docstring)
    supports_segments: ClassVar[bool] = False
    # whether a head's output may read other heads' inputs by design (a norm over all heads, head routing or
    # mixing); conformance otherwise holds every head to be computed from its own inputs alone
    mixes_heads: ClassVar[bool] = False
    # whether each new input shape compiles a kernel (torch.compile): conformance then runs variants of an
    # input one call each instead of stacking them along the batch, which would compile one per batch size
    compiles_per_shape: ClassVar[bool] = False
    # the largest |q.k| / sqrt(D) the attention's math takes (None: any); conformance's large_logits check
    # probes scores of that size instead of its default, and says so
    max_logit: ClassVar["float | None"] = None
    # the implementation that runs (e.g. "torch", "triton", "flex"); an attention with several backends
    # sets it per instance. Recorded in every bench result row.
    backend: str = "torch"
    # the hyper-parameters (attribute names) extra_repr shows as name=value after the pattern and the sizes
    repr_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pattern: "Pattern | str", num_heads: int, head_dim: int):
        super().__init__()
        pattern = Pattern.parse(pattern)
        declared = type(self).patterns
        if pattern not in declared:
            reason = type(self).unsupported_reasons.get(pattern, "")
            raise UnsupportedPattern(type(self).name or type(self).__name__, pattern, declared, reason)
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads} and {head_dim}")
        self.pattern: Pattern = pattern
        self.causal: bool = pattern.causal
        self.cross: bool = pattern.cross
        self.num_heads: int = num_heads
        self.head_dim: int = head_dim

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None" = None,
        *, segment_ids: "torch.Tensor | None" = None,
    ) -> torch.Tensor:
        """The attention output. `segment_ids` exists only on attentions with supports_segments (others
        may omit the keyword from their signature)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(q, k, v, key_padding_mask=None)")

    def reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None" = None
    ) -> torch.Tensor:
        """The naive formulation of the same math (per-row loop or O(L^2) form), sharing this module's
        parameters; conformance compares `forward` against it, outputs and gradients."""
        raise NotImplementedError

    @classmethod
    def has_reference(cls) -> bool:
        return cls.reference is not Attention.reference

    @classmethod
    def unavailable_reason(cls, device: "torch.device | str") -> "str | None":
        """Why this attention cannot run on `device` (a missing package or device), or None when it can."""
        return None

    @classmethod
    def compiles_kernels(cls, hparams: "Mapping[str, object]") -> bool:
        """Whether an instance built with `hparams` compiles a kernel per input shape, known without building
        it: `compiles_per_shape`, or the FlexAttention path of an attention with a `backend` option
        (`backend="flex"`). The pool executor runs such cells one at a time on one worker, so each reuses the
        kernels the previous one compiled."""
        return cls.compiles_per_shape or hparams.get("backend") == "flex"

    # optional cost declarations: FLOPs and peak memory of one forward call ---------------------------

    def algorithmic_flops(self, batch: int, lq: int, lk: int, kv_heads: int) -> "int | None":
        """Matmul FLOPs of one forward call of *this* algorithm on q (batch, num_heads, lq, head_dim) and
        k, v (batch, kv_heads, lk, head_dim), as torch.utils.flop_counter.FlopCounterMode counts them on
        forward() (a test holds every declaration to that); None when undeclared."""
        return None

    def peak_memory_estimate(self, batch: int, lq: int, lk: int, kv_heads: int, mode: str,
                             dtype: torch.dtype) -> "int | None":
        """An upper estimate of the bytes one call of bench mode `mode` allocates beyond its inputs (what
        cab's memory pass measures), so a sweep can skip a cell that cannot fit; None when undeclared."""
        return None

    def computed_pairs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None" = None
    ) -> "int | None":
        """How many (batch, query head, query, key) score pairs forward() computes on these inputs, for
        sparse, local and routing attentions whose work is a subset of the dense pairs (content-based ones
        run their selection to count); None when undeclared (dense, or not pair-based like linear ones).
        The bench records it with the achieved sparsity 1 - computed / visible."""
        return None

    @classmethod
    def has_computed_pairs(cls) -> bool:
        return cls.computed_pairs is not Attention.computed_pairs

    # optional: incremental decoding (causal patterns) ------------------------------------------------
    # A decoder calls decode_init once, then decode_step once per query token. CS: each step brings the
    # new token's query, key and value, and the query sees every key so far (its own included). CC: the
    # keys and values are a fixed memory given to decode_init; each step brings one query. Decoding token
    # by token must reproduce forward() row by row (the conformance check `decode` holds it to that).

    def decode_init(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None" = None,
                    capacity: "int | None" = None) -> Any:
        """The decoding state after keys and values k, v (B, Hkv, L0, D), key_padding_mask (B, L0).

        CS: the L0 tokens already decoded (L0 may be 0); `capacity` is the total number of tokens the
        caller means to hold, so a cache can be allocated once. CC: the memory every query attends."""
        raise NotImplementedError(f"{type(self).__name__} provides no incremental decoding")

    def decode_step(self, state: Any, q: torch.Tensor, k: "torch.Tensor | None" = None,
                    v: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, Any]":
        """(output (B, Hq, 1, Dv) of the query q (B, Hq, 1, Dk), the state after it). CS: k and v
        (B, Hkv, 1, D) are the new token's; CC: they are None.

        `state` stays valid: stepping again from it gives the same result (an implementation may write
        into preallocated storage past the state's length, so only the latest state derived from a given
        state is guaranteed)."""
        raise NotImplementedError(f"{type(self).__name__} provides no incremental decoding")

    @classmethod
    def has_decode(cls) -> bool:
        return cls.decode_step is not Attention.decode_step

    @staticmethod
    def decode_state_bytes(state: Any) -> int:
        """Bytes held by a decoding state: every distinct tensor storage reachable through tuples, lists,
        dicts and dataclasses (a KV cache counts its whole allocated buffer)."""
        seen: dict[int, int] = {}

        def visit(value: Any) -> None:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            elif isinstance(value, (tuple, list)):
                for item in value:
                    visit(item)
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                for f in dataclasses.fields(value):
                    visit(getattr(value, f.name))

        visit(state)
        return sum(seen.values())

    # helpers shared by implementations -------------------------------------------------------------

    def segments(self, segment_ids: "torch.Tensor | None", q: torch.Tensor, k: torch.Tensor) -> "torch.Tensor | None":
        """Validated int64 segment ids for a forward call on q, k (None passes through); raises for an
        attention without supports_segments, a cross pattern, or a shape other than (B, Lq) with Lq == Lk."""
        if segment_ids is None:
            return None
        if not type(self).supports_segments:
            raise ValueError(f"attention {type(self).name or type(self).__name__!r} does not support segment_ids")
        return validate_segment_ids(self.pattern, segment_ids, q.shape[0], q.shape[-2], k.shape[-2]).to(q.device)

    def visible(
        self, lq: int, lk: int, key_padding_mask: "torch.Tensor | None", device: "torch.device",
        segment_ids: "torch.Tensor | None" = None,
    ) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """(mask, empty_rows): the bool visibility mask broadcastable to (B, H, Lq, Lk), True = visible
        (restricted to each query's segment when segment_ids is given), with rows that see no key opened up
        (so softmax stays finite), and the bool (B, 1, Lq, 1) marker of those rows, whose output the caller
        must zero (None when there are none)."""
        mask = attention_mask(self.pattern, lq, lk, key_padding_mask, device=device, segment_ids=segment_ids)
        empty = ~mask.any(dim=-1, keepdim=True)
        if not bool(empty.any()):
            return mask, None
        return mask | empty, empty

    def extra_repr(self) -> str:
        fields = [f"pattern={self.pattern.value}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}"]
        return ", ".join(fields + [f"{name}={getattr(self, name)}" for name in type(self).repr_fields])


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand (B, Hkv, L, D) keys or values to (B, num_heads, L, D) for grouped-query attention."""
    hkv = x.shape[1]
    if hkv == num_heads:
        return x
    if num_heads % hkv:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({hkv})")
    return x.repeat_interleave(num_heads // hkv, dim=1)
