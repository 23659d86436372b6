"""Deliberately broken attentions, one defect each, for testing that conformance flags each of them for the
right reason. A plugin file: load it with `cab.registry.load_plugin(path)` or `cab check --plugin path`.

Each is exact softmax attention (`_softmax`) with one thing wrong, so that exactly one kind of check trips.
"""

from __future__ import annotations

import time

import torch

import cab
from cab.attention.base import repeat_kv

LEAK = 1e-3  # weight of the future information mixed into the leaking attentions
ALL = ("NS", "CS", "NC", "CC")


def _softmax(attn: cab.Attention, q, k, v, key_padding_mask=None, scale=None, causal=None):
    """Exact attention for `attn`'s pattern (causal=False forces the full key mask)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal is False:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)[None, None]
        if key_padding_mask is not None:
            mask = mask & ~key_padding_mask[:, None, None, :]
    else:
        mask = cab.patterns.attention_mask(attn.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
    seen = mask.any(dim=-1, keepdim=True)  # rows that see no key give zeros, as the contract says
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0), dim=-1)
    return torch.where(seen, probs @ v, torch.zeros((), dtype=v.dtype, device=v.device))


def _next_row(x: torch.Tensor) -> torch.Tensor:
    """Row i holds row i + 1 of x (the last row holds zeros)."""
    return torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], dim=-2)


@cab.register_attention("broken_causal_leak", patterns=("CS",), family="broken", exact=False)
class CausalLeak(cab.Attention):
    """Causal self attention that mixes in the noncausal output with weight 1e-3 (a future leak).
    With float64=False it refuses float64 inputs, so conformance must fall back to float32."""

    def __init__(self, pattern, num_heads, head_dim, float64: bool = True):
        super().__init__(pattern, num_heads, head_dim)
        self.float64 = float64

    def forward(self, q, k, v, key_padding_mask=None):
        if q.dtype == torch.float64 and not self.float64:
            raise TypeError("this kernel has no float64 variant")
        causal = _softmax(self, q, k, v, key_padding_mask)
        full = _softmax(self, q, k, v, key_padding_mask, causal=False)
        return (1 - LEAK) * causal + LEAK * full


@cab.register_attention("broken_query_leak", patterns=("CC",), family="broken", exact=False)
class QueryLeak(cab.Attention):
    """Causal cross attention whose row i adds 1e-3 x the output of query i + 1 (a future-query leak)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        out = _softmax(self, q, k, v, key_padding_mask)
        return out + LEAK * _next_row(out)


@cab.register_attention("broken_ignores_padding", patterns=("NS", "NC"), family="broken", exact=False)
class IgnoresPadding(cab.Attention):
    """Noncausal attention that never looks at key_padding_mask."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, None)


@cab.register_attention("broken_raises", patterns=ALL, family="broken", exact=False)
class Raises(cab.Attention):
    """Raises in forward."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        raise RuntimeError("deliberate failure inside forward")


@cab.register_attention("broken_nan", patterns=ALL, family="broken", exact=False)
class ReturnsNaN(cab.Attention):
    """Exact attention with NaN in its last output row."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        out = _softmax(self, q, k, v, key_padding_mask)
        last = torch.arange(out.shape[-2], device=out.device)[:, None] == out.shape[-2] - 1
        return torch.where(last, torch.full_like(out, float("nan")), out)


@cab.register_attention("broken_wrong_shape", patterns=ALL, family="broken", exact=False)
class WrongShape(cab.Attention):
    """Drops the last feature of the output: (B, Hq, Lq, Dv - 1)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask)[..., :-1]


@cab.register_attention("broken_detached", patterns=ALL, family="broken", exact=False)
class Detached(cab.Attention):
    """Returns a detached output (a kernel with no autograd support): no gradient reaches anything."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask).detach()


@cab.register_attention("broken_noncausal", patterns=("CS",), family="broken", exact=False)
class NonCausal(cab.Attention):
    """Declares causal self but attends to every key."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask, causal=False)


@cab.register_attention("broken_uninitialised", patterns=ALL, family="broken", exact=False)
class Uninitialised(cab.Attention):
    """Allocates its output with torch.empty and never writes the last row."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        exact = _softmax(self, q, k, v, key_padding_mask)
        out = torch.empty(exact.shape, dtype=exact.dtype, device=exact.device)
        out[..., :-1, :] = exact[..., :-1, :]
        return out


@cab.register_attention("broken_bad_reference", patterns=ALL, family="broken", exact=False)
class BadReference(cab.Attention):
    """Correct forward, but its reference() uses a softmax temperature 5% off."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask)

    def reference(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask, scale=1.05 * q.shape[-1] ** -0.5)


@cab.register_attention("broken_wrong_scale", patterns=ALL, family="broken", exact=True, gqa=False)
class WrongScale(cab.Attention):
    """Claims to be exact but scales scores by 1/d instead of 1/sqrt(d)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask, scale=1.0 / q.shape[-1])


@cab.register_attention("broken_accepts_undeclared", patterns=("NS",), family="broken", exact=False)
class AcceptsUndeclared(cab.Attention):
    """Declares only NS but builds for any pattern (computing NS attention)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__("NS", num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask)


@cab.register_attention("broken_block_size", patterns=ALL, family="broken", exact=False)
class NeedsBlocks(cab.Attention):
    """Works only when both lengths are multiples of 16 (a kernel without tail handling)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        if q.shape[-2] % 16 or k.shape[-2] % 16:
            raise ValueError(f"lengths must be multiples of 16, got {q.shape[-2]} and {k.shape[-2]}")
        return _softmax(self, q, k, v, key_padding_mask)


@cab.register_attention("broken_oom", patterns=ALL, family="broken", exact=False)
class OutOfMemory(cab.Attention):
    """Runs out of memory in forward."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")


@cab.register_attention("broken_slow", patterns=ALL, family="broken", exact=False)
class Slow(cab.Attention):
    """Hangs for `seconds` in every forward call (for time limits)."""

    def __init__(self, pattern, num_heads, head_dim, seconds: float = 30.0):
        super().__init__(pattern, num_heads, head_dim)
        self.seconds = seconds

    def forward(self, q, k, v, key_padding_mask=None):
        time.sleep(self.seconds)
        return _softmax(self, q, k, v, key_padding_mask)
