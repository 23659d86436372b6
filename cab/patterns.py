"""The four attention patterns of CAB, their visibility masks and visible-pair counts.

NS noncausal self, CS causal self, NC noncausal cross, CC causal cross. CC is *query-side* causality:
output row i may use every key and value but no query after i (a decoder cross-attending to an encoder,
decoded one query at a time), so its key-visibility mask is full.
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


def visibility_mask(pattern: "Pattern | str", lq: int, lk: int, device: "torch.device | str | None" = None) -> torch.Tensor:
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
) -> torch.Tensor:
    """Bool mask broadcastable to (B, H, Lq, Lk), True = visible: pattern visibility AND not padding."""
    mask = visibility_mask(pattern, lq, lk, device=device)[None, None]
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.to(device=mask.device, dtype=torch.bool)[:, None, None, :]
    return mask


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
