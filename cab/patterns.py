"""The four attention patterns of CAB, their visibility masks and visible-pair counts.

NS noncausal self, CS causal self, NC noncausal cross, CC causal cross. CC is *query-side* causality:
output row i may use every key and value but no query after i (a decoder cross-attending to an encoder,
decoded one query at a time), so its key-visibility mask is full.

Segments (packed variable-length sequences) restrict the self patterns further: with segment ids (B, L),
a query attends only the keys of its own segment, where a segment is a maximal run of equal consecutive
ids (so an id that reappears later starts a new segment, exactly as cu_seqlens would describe the packing).
`segment_runs`, `segment_mask` and the cu_seqlens conversions below are the shared definitions.
"""

from __future__ import annotations

import difflib
from enum import Enum

import torch


class Pattern(str, Enum):
    """One of CAB's four attention patterns; the plain strings "NS", "CS", "NC", "CC" are accepted too."""

    NS = "NS"
    CS = "CS"
    NC = "NC"
    CC = "CC"

    def __str__(self) -> str:
        return self.value

    @property
    def causal(self) -> bool:
        return self in (Pattern.CS, Pattern.CC)

    @property
    def cross(self) -> bool:
        return self in (Pattern.NC, Pattern.CC)

    @property
    def long_name(self) -> str:
        return _LONG_NAMES[self]

    @classmethod
    def parse(cls, value: "Pattern | str") -> "Pattern":
        """Accept a Pattern, its code ("cs") or its long name ("causal self"); suggest near matches."""
        if isinstance(value, Pattern):
            return value
        if not isinstance(value, str):
            raise ValueError(f"a pattern must be one of NS, CS, NC, CC, got {value!r}")
        text = value.strip().upper().replace("-", " ").replace("_", " ")
        if text in cls.__members__:
            return cls[text]
        for pattern, long_name in _LONG_NAMES.items():
            if text == long_name.upper():
                return pattern
        choices = list(cls.__members__) + [n for n in _LONG_NAMES.values()]
        near = difflib.get_close_matches(value, choices, n=2, cutoff=0.4)
        hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
        raise ValueError(f"unknown pattern {value!r}{hint}; patterns are NS, CS, NC, CC")

    @classmethod
    def parse_many(cls, values: "str | list | tuple | None") -> "tuple[Pattern, ...]":
        """Parse "NS,CS" or a list of patterns; None means all four."""
        if values is None:
            return tuple(cls)
        if isinstance(values, (str, Pattern)):
            values = [v for v in str(values).split(",") if v.strip()]
        return tuple(dict.fromkeys(cls.parse(v) for v in values))


_LONG_NAMES = {
    Pattern.NS: "noncausal self",
    Pattern.CS: "causal self",
    Pattern.NC: "noncausal cross",
    Pattern.CC: "causal cross",
}


def visibility_mask(
    pattern: "Pattern | str", lq: int, lk: int, device: "torch.device | str | None" = None
) -> torch.Tensor:
    """Bool (Lq, Lk) mask, True where query i may attend key j under the pattern.

    Causal self is aligned bottom-right (query i sees keys j <= i + Lk - Lq), which is the usual
    triangle when Lq == Lk and the KV-cache convention when a few new queries attend a longer past.
    """
    pattern = Pattern.parse(pattern)
    if pattern is not Pattern.CS:
        return torch.ones(lq, lk, dtype=torch.bool, device=device)
    rows = torch.arange(lq, device=device).unsqueeze(1)
    cols = torch.arange(lk, device=device).unsqueeze(0)
    return cols <= rows + (lk - lq)


def attention_mask(
    pattern: "Pattern | str",
    lq: int,
    lk: int,
    key_padding_mask: "torch.Tensor | None" = None,
    device: "torch.device | str | None" = None,
    segment_ids: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """Bool mask broadcastable to (B, H, Lq, Lk), True = visible: pattern visibility AND not padding AND
    (with segment ids, self patterns only, Lq == Lk) the same segment."""
    mask = visibility_mask(pattern, lq, lk, device=device)[None, None]
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.to(device=mask.device, dtype=torch.bool)[:, None, None, :]
    if segment_ids is not None:
        validate_segment_ids(pattern, segment_ids, None, lq, lk)
        mask = mask & segment_mask(segment_ids.to(mask.device))
    return mask


# segments: packed variable-length sequences ------------------------------------------------------------


def validate_segment_ids(pattern: "Pattern | str", segment_ids: torch.Tensor, batch: "int | None", lq: int,
                         lk: int) -> torch.Tensor:
    """Check segment ids for a call of `pattern` with Lq queries and Lk keys: an integer (B, L) tensor,
    self patterns only, Lq == Lk == L (and B == batch when given). Returns them as int64."""
    pattern = Pattern.parse(pattern)
    if pattern.cross:
        raise ValueError(f"segment ids apply to the self patterns (NS, CS), not {pattern.value}: cross attention "
                         "would need separate query and key segmentations")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"segment_ids must be a (B, L) integer tensor, got {got}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must hold integers, got {segment_ids.dtype}")
    if lq != lk or segment_ids.shape[1] != lq:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} need Lq == Lk == L, got Lq={lq} Lk={lk}")
    if batch is not None and segment_ids.shape[0] != batch:
        raise ValueError(f"segment_ids has batch {segment_ids.shape[0]}, the inputs {batch}")
    return segment_ids.long()


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) int64 index of each position's segment within its row: 0 at the start, +1 wherever the id
    differs from the previous position's (segments are maximal runs of equal consecutive ids)."""
    ids = segment_ids.long()
    change = torch.zeros_like(ids)
    change[:, 1:] = (ids[:, 1:] != ids[:, :-1]).long()
    return change.cumsum(dim=1)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, L, L): True where query i and key j are in the same segment."""
    runs = segment_runs(segment_ids)
    return (runs[:, :, None] == runs[:, None, :])[:, None]


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, length: "int | None" = None) -> torch.Tensor:
    """(1, L) segment ids of one packed row from cumulative sequence lengths [0, l0, l0+l1, ..., L]
    (FlashAttention's varlen convention): position p gets s with cu[s] <= p < cu[s+1]. `length` (default
    cu[-1]) may exceed cu[-1]: the tail becomes one more segment (e.g. padding)."""
    cu = cu_seqlens.long().flatten()
    if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    total = int(cu[-1]) if length is None else int(length)
    if total < int(cu[-1]):
        raise ValueError(f"length {total} is shorter than cu_seqlens[-1] = {int(cu[-1])}")
    positions = torch.arange(total, device=cu.device)
    return (torch.searchsorted(cu[1:], positions, right=True)).unsqueeze(0)


def cu_seqlens_from_segment_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative sequence lengths [0, ..., L] of the segments (runs) of one packed row, (L,) or
    (1, L) ids; the inverse of segment_ids_from_cu_seqlens up to the id values."""
    ids = segment_ids.long()
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError("cu_seqlens describe one packed row; pass segment ids of shape (L,) or (1, L)")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"segment ids must be (L,) or (1, L), got {tuple(segment_ids.shape)}")
    starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=torch.long, device=ids.device)
    end = torch.full((1,), ids.numel(), dtype=torch.long, device=ids.device)
    return torch.cat([zero, starts, end] if ids.numel() else [zero]).to(torch.int32)


def visible_pairs(
    pattern: "Pattern | str",
    lq: int,
    lk: int,
    key_padding_mask: "torch.Tensor | None" = None,
    convention: str = "exact",
) -> int:
    """Number of visible (query, key) pairs summed over the batch rows (per head).

    convention="exact" counts every row exactly (CS: L(L+1)/2); convention="flash" uses the
    FlashAttention/ThunderKittens convention for causal self (L^2/2) to compare with published figures.
    Without a padding mask the count is for one batch element; with one, it is summed over the batch.
    """
    pattern = Pattern.parse(pattern)
    if convention not in ("exact", "flash"):
        raise ValueError(f"convention must be 'exact' or 'flash', got {convention!r}")
    if key_padding_mask is None:
        if pattern is Pattern.CS:
            if convention == "flash":
                return lq * lk // 2
            # bottom-right aligned: row i sees min(lk, i + 1 + lk - lq) keys (at least 0)
            offset = lk - lq
            return int(sum(max(0, min(lk, i + 1 + offset)) for i in range(lq)))
        return lq * lk
    if pattern is Pattern.CS and convention == "flash":
        real_keys = (~key_padding_mask.bool()).sum(dim=1)
        return int((lq * real_keys).sum()) // 2
    mask = attention_mask(pattern, lq, lk, key_padding_mask)
    return int(mask.expand(key_padding_mask.shape[0], 1, lq, lk).sum())
