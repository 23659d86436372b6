"""The KV cache of incremental decoding: `KVCache` (keys and values allocated once, appended in place) and
`KVCacheAttention`, the decode_init/decode_step of every attention that decodes by attending its cached keys
(subclasses attend one query step), with the grouped-query view the cached attention needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cab.attention.base import Attention


@dataclass(frozen=True)
class KVCache:
    """The decoding state of an exact attention: keys and values (B, Hkv, capacity, D) of which the first
    `length` are in use, and `real` (B, capacity) bool marking real keys (None when none is padding)."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int
    real: "torch.Tensor | None" = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def in_use(self) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]":
        """(keys, values, real) of the `length` tokens in use."""
        n = self.length
        real = None if self.real is None else self.real[:, :n]
        return self.keys[:, :, :n], self.values[:, :, :n], real

    def append(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """The cache with one more (real) token, k and v (B, Hkv, 1, D); writes in place past `length`,
        doubling the buffers when they are full, so this cache keeps describing its own tokens."""
        n, cache = self.length, self
        if n == self.capacity:
            cache = self._grown(max(16, 2 * n))
        cache.keys[:, :, n] = k[:, :, 0]
        cache.values[:, :, n] = v[:, :, 0]
        if cache.real is not None:
            cache.real[:, n] = True
        return KVCache(cache.keys, cache.values, n + 1, cache.real)

    def _grown(self, capacity: int) -> "KVCache":
        keys, values = (x.new_empty(*x.shape[:2], capacity, x.shape[-1]) for x in (self.keys, self.values))
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        real = None
        if self.real is not None:
            real = self.real.new_zeros(self.real.shape[0], capacity)
            real[:, : self.length] = self.real[:, : self.length]
        return KVCache(keys, values, self.length, real)


def check_step_inputs(attn: Attention, k: "torch.Tensor | None", v: "torch.Tensor | None") -> None:
    """Raise for a decode step given the wrong inputs: a CC step takes only the query (the memory is fixed), a CS
    step also the new token's key and value."""
    if attn.cross:
        if k is not None or v is not None:
            raise ValueError("causal cross decoding attends a fixed memory: pass only the query")
    elif k is None or v is None:
        raise ValueError("causal self decoding needs the new token's key and value")


class KVCacheAttention(Attention):
    """Incremental decoding for exact attentions over a KV cache; subclasses attend one query step."""

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if not self.causal:
            raise ValueError(f"incremental decoding applies to the causal patterns CS and CC, not {self.pattern.value}")
        real = None if key_padding_mask is None else ~key_padding_mask.to(device=k.device, dtype=torch.bool)
        if self.cross:
            return KVCache(k, v, k.shape[-2], real)
        context = k.shape[-2]
        size = max(capacity or 0, context)
        keys, values = (x.new_empty(*x.shape[:2], size, x.shape[-1]) for x in (k, v))
        keys[:, :, :context], values[:, :, :context] = k, v
        cache_real = None
        if real is not None:
            cache_real = real.new_zeros(real.shape[0], size)
            cache_real[:, :context] = real
        return KVCache(keys, values, context, cache_real)

    def decode_step(self, state, q, k=None, v=None):
        check_step_inputs(self, k, v)
        if self.cross:
            cache = state
        else:
            cache = state.append(k, v)
        keys, values, real = cache.in_use()
        return self.attend_cached(q, keys, values, real), cache

    def attend_cached(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      real: "torch.Tensor | None") -> torch.Tensor:
        """Output (B, Hq, 1, Dv) of one query step q (B, Hq, 1, Dk) over every cached key."""
        raise NotImplementedError


def grouped_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, L, D) -> (B, Hkv, G, L, D): the query heads sharing one key/value head (no copy)."""
    b, hq, lq, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({kv_heads})")
    return q.reshape(b, kv_heads, hq // kv_heads, lq, d)


def no_real_key(real: "torch.Tensor | None") -> "torch.Tensor | None":
    """(B,) bool: batch rows whose cache holds no real key (their output is zero), or None."""
    if real is None:
        return None
    empty = ~real.any(dim=-1)
    return empty if bool(empty.any()) else None
