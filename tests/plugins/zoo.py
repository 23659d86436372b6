"""A zoo of subtly broken attentions, one flaw each, of the kinds real kernels have and that only a gate
checking what is published catches: flaws that appear only at some shapes, only in some dtypes, only in
gradients, only without a mask, only with padding that is not on the right, only in rows that see no key,
in the memory contract, at large logits, in a reference that shares the flawed code, and flaws that an
unprepared gate would blame on the wrong check. A plugin file (`cab check tests/plugins/zoo.py`).

Every one is exact softmax attention (`_exact`, correct in every pattern, with padding and empty rows) with
one thing changed; `FLAWS` lists, for each, its class and the checks that must catch it.
"""

from __future__ import annotations

import torch

import cab
from cab.attention.base import repeat_kv

ALL = ("NS", "CS", "NC", "CC")


def _exact(attn: cab.Attention, q, k, v, key_padding_mask=None, scale=None, causal=True, keys=None):
    """Exact attention for attn's pattern: rows that see no key give zeros. causal=False drops the causal
    mask; keys=n keeps only the first n keys."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    lq, lk = q.shape[-2], k.shape[-2]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal and attn.pattern.value == "CS":
        visible = torch.arange(lk, device=q.device)[None, :] <= (torch.arange(lq, device=q.device) + lk - lq)[:, None]
    if keys is not None:
        visible = visible & (torch.arange(lk, device=q.device) < keys)[None, :]
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    seen = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0.0), dim=-1)
    return torch.where(seen, probs @ v, torch.zeros((), dtype=v.dtype, device=v.device))


def _register(name: str, patterns=ALL, exact: bool = True):
    return cab.register_attention(name, patterns=patterns, family="zoo", exact=exact,
                                  citation="cab test zoo: a deliberate flaw")


class _Zoo(cab.Attention):
    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)


# 1. only at the published shapes ------------------------------------------------------------------------

@_register("zoo_leak_past_512", patterns=("CS",))
class LeakPast512(_Zoo):
    """Causal self attention whose rows at and past 512 also see the next key (a second-tile mask bug)."""

    def forward(self, q, k, v, key_padding_mask=None):
        out = _exact(self, q, k, v, key_padding_mask)
        if q.shape[-2] <= 512:
            return out
        ahead = _exact(self, q[..., 512:-1, :], k[..., 513:, :], v[..., 513:, :], None, causal=False)
        mixed = out.clone()
        mixed[..., 512:-1, :] = 0.99 * out[..., 512:-1, :] + 0.01 * ahead
        return mixed


@_register("zoo_long_path_leak", patterns=("CS",))
class LongPathLeak(_Zoo):
    """A long-sequence path (past 1,600 tokens, beyond the fixed suite's lengths) whose diagonal tile lets
    each row see the key after it: only the probe of a published shape that long can catch it (it is not in
    FLAWS, which lists what the fixed suite catches)."""

    def forward(self, q, k, v, key_padding_mask=None):
        out = _exact(self, q, k, v, key_padding_mask)
        if q.shape[-2] <= 1600:
            return out
        return out + 1e-3 * torch.cat([out[..., 1:, :], out[..., :1, :]], dim=-2)


@_register("zoo_leak_multiple_of_64", patterns=("CS", "CC"))
class LeakMultipleOf64(_Zoo):
    """A fast path taken when the query length is a multiple of 64 mixes in the next query row's output."""

    def forward(self, q, k, v, key_padding_mask=None):
        out = _exact(self, q, k, v, key_padding_mask)
        if q.shape[-2] % 64:
            return out
        return out + 1e-3 * torch.cat([out[..., 1:, :], out[..., :1, :]], dim=-2)


@_register("zoo_wrong_at_d64")
class WrongAtD64(_Zoo):
    """An exact attention whose head-dim-64 specialisation scales the scores by 1/d instead of 1/sqrt(d)."""

    def forward(self, q, k, v, key_padding_mask=None):
        scale = 1.0 / q.shape[-1] if q.shape[-1] == 64 else None
        return _exact(self, q, k, v, key_padding_mask, scale=scale)


@_register("zoo_drops_keys_past_256")
class DropsKeysPast256(_Zoo):
    """An exact attention that silently attends to the first 256 keys only (a fixed-size key buffer)."""

    def forward(self, q, k, v, key_padding_mask=None):
        return _exact(self, q, k, v, key_padding_mask, keys=256)


@_register("zoo_many_heads")
class ManyHeads(_Zoo):
    """With more than 4 query heads, heads past the fourth read the keys of head 0 (a head-index bug)."""

    def forward(self, q, k, v, key_padding_mask=None):
        if q.shape[1] <= 4:
            return _exact(self, q, k, v, key_padding_mask)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        k = torch.cat([k[:, :4], k[:, :1].expand(-1, q.shape[1] - 4, -1, -1)], dim=1)
        return _exact(self, q, k, v, key_padding_mask)


# 2. only in the dtype that is timed -----------------------------------------------------------------------

@_register("zoo_fast_path_noncausal", patterns=("CS",), exact=False)
class FastPathNonCausal(_Zoo):
    """float64 runs the correct path; the fast float32/half path forgets the causal mask."""

    def forward(self, q, k, v, key_padding_mask=None):
        return _exact(self, q, k, v, key_padding_mask, causal=q.dtype == torch.float64)


@_register("zoo_half_ignores_padding", patterns=("NS", "NC"), exact=False)
class HalfIgnoresPadding(_Zoo):
    """The bfloat16/float16 path drops the key padding mask."""

    def forward(self, q, k, v, key_padding_mask=None):
        half = q.dtype in (torch.float16, torch.bfloat16)
        return _exact(self, q, k, v, None if half else key_padding_mask)


# 3. only in gradient values ---------------------------------------------------------------------------------

@_register("zoo_detached_normaliser", exact=False)
class DetachedNormaliser(_Zoo):
    """Outputs exact, but the softmax normaliser is detached: dq and dk are wrong."""

    def forward(self, q, k, v, key_padding_mask=None):
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask, empty = self.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True).detach())
        out = (weights / weights.sum(dim=-1, keepdim=True).detach()) @ vr
        return out if empty is None else out.masked_fill(empty, 0.0)


class _MaskFreeBackward(torch.autograd.Function):
    """Exact masked forward; the backward recomputes the softmax without the padding mask."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        ctx.save_for_backward(q, k, v)
        return probs @ v

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # the mask is forgotten here
        dv = probs.transpose(-1, -2) @ dout
        dp = dout @ v.transpose(-1, -2)
        ds = probs * (dp - (dp * probs).sum(dim=-1, keepdim=True))
        return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv, None


@_register("zoo_backward_ignores_padding", patterns=("NS", "NC"), exact=False, )
class BackwardIgnoresPadding(_Zoo):
    """A custom autograd function whose backward ignores the key padding mask (forward is right)."""

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)[None, None]
        if key_padding_mask is not None:
            mask = mask & ~key_padding_mask[:, None, None, :]
        seen = mask.any(dim=-1, keepdim=True)
        out = _MaskFreeBackward.apply(q, k, v, mask | ~seen)
        return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


# 4. only without a mask -------------------------------------------------------------------------------------

@_register("zoo_unmasked_batch_sum", patterns=("NS", "NC"), exact=False)
class UnmaskedBatchSum(_Zoo):
    """Without a mask, a 'fast path' linear attention sums its key-value state over the whole batch."""

    def forward(self, q, k, v, key_padding_mask=None):
        if key_padding_mask is not None:
            return _exact(self, q, k, v, key_padding_mask)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        state = (fk.transpose(-1, -2) @ v).sum(dim=0, keepdim=True)  # over the batch: the flaw
        norm = fk.sum(dim=-2, keepdim=True).sum(dim=0, keepdim=True)
        return (fq @ state) / (fq * norm).sum(dim=-1, keepdim=True)


# 5. padding that is not on the right, rows that see no key ------------------------------------------------

@_register("zoo_lengths_from_mask")
class LengthsFromMask(_Zoo):
    """Turns the key padding mask into lengths (varlen style), which assumes every pad is on the right."""

    def forward(self, q, k, v, key_padding_mask=None):
        if key_padding_mask is None:
            return _exact(self, q, k, v)
        lengths = (~key_padding_mask).sum(dim=-1)
        as_right = torch.arange(k.shape[-2], device=q.device)[None, :] >= lengths[:, None]
        return _exact(self, q, k, v, as_right)


@_register("zoo_nan_empty_rows")
class NaNEmptyRows(_Zoo):
    """The textbook masked_fill(-inf) + softmax: a row that sees no key gives NaN instead of zeros."""

    def forward(self, q, k, v, key_padding_mask=None):
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
        visible = cab.patterns.attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ vr


# 6. the memory contract -------------------------------------------------------------------------------------

@_register("zoo_inplace_normalise", exact=False)
class InplaceNormalise(_Zoo):
    """Cosine-similarity attention that normalises the caller's q and k in place."""

    def forward(self, q, k, v, key_padding_mask=None):
        with torch.no_grad():
            q.div_(q.norm(dim=-1, keepdim=True))
            k.div_(k.norm(dim=-1, keepdim=True))
        return _exact(self, q, k, v, key_padding_mask, scale=4.0)


@_register("zoo_reused_output")
class ReusedOutput(_Zoo):
    """Writes every output into one buffer it keeps, and returns that buffer."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)
        self._out: "torch.Tensor | None" = None

    def forward(self, q, k, v, key_padding_mask=None):
        out = _exact(self, q, k, v, key_padding_mask)
        if self._out is None or self._out.shape != out.shape or self._out.dtype != out.dtype:
            self._out = torch.empty_like(out)
        with torch.no_grad():
            self._out.copy_(out)
        return self._out if not out.requires_grad else out + 0 * self._out


# 7. large logits ---------------------------------------------------------------------------------------------

@_register("zoo_no_max_subtraction")
class NoMaxSubtraction(_Zoo):
    """Softmax as exp(s) / sum exp(s), without subtracting the row maximum: overflows past |logit| ~ 88."""

    def forward(self, q, k, v, key_padding_mask=None):
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask, empty = self.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        weights = torch.exp(scores).masked_fill(~mask, 0.0)
        out = (weights / weights.sum(dim=-1, keepdim=True)) @ vr
        return out if empty is None else out.masked_fill(empty, 0.0)


# 8. a reference that shares the flawed code ----------------------------------------------------------------

def _leaky_selection(lq: int, lk: int, device) -> torch.Tensor:
    """Top keys of a local band, shared by forward and reference: off by one, it admits key i + 1."""
    rows = torch.arange(lq, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    return (cols <= rows + 1) & (cols >= rows - 8)


@_register("zoo_shared_leaky_reference", patterns=("CS",), exact=False)
class SharedLeakyReference(_Zoo):
    """A causal band attention whose forward and reference() share a selection that sees one key ahead:
    forward agrees with reference() exactly, so only the structural checks can catch it."""

    def _attend(self, q, k, v, key_padding_mask):
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        visible = _leaky_selection(q.shape[-2], k.shape[-2], q.device)[None, None]
        if key_padding_mask is not None:
            visible = visible & ~key_padding_mask[:, None, None, :]
        seen = visible.any(dim=-1, keepdim=True)
        scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0.0), dim=-1)
        return torch.where(seen, probs @ vr, torch.zeros((), dtype=v.dtype, device=v.device))

    def forward(self, q, k, v, key_padding_mask=None):
        return self._attend(q, k, v, key_padding_mask)

    def reference(self, q, k, v, key_padding_mask=None):
        return self._attend(q, k, v, key_padding_mask)


# 9. flaws an unprepared gate blames on the wrong check -----------------------------------------------------

@_register("zoo_dropout_in_eval", exact=False)
class DropoutInEval(_Zoo):
    """Attention dropout left on in eval mode (F.dropout with training=True): random from call to call."""

    def forward(self, q, k, v, key_padding_mask=None):
        out = _exact(self, q, k, v, key_padding_mask)
        return torch.nn.functional.dropout(out, p=0.1, training=True)


@_register("zoo_mutates_values", exact=False)
class MutatesValues(_Zoo):
    """Scales the caller's v in place (to save a copy) and attends with it."""

    def forward(self, q, k, v, key_padding_mask=None):
        with torch.no_grad():
            v.mul_(0.5)
        return _exact(self, q, k, v, key_padding_mask)


# flaw -> (class, patterns to check, dtype, the checks any of which must catch it) ---------------------------
FLAWS = {
    "zoo_leak_past_512": ("published shapes", ("CS",), "float32", {"large_shapes"}),
    "zoo_leak_multiple_of_64": ("published shapes", ("CS", "CC"), "float32", {"large_shapes"}),
    "zoo_wrong_at_d64": ("published shapes", ALL, "float32", {"large_shapes"}),
    "zoo_drops_keys_past_256": ("published shapes", ALL, "float32", {"large_shapes"}),
    "zoo_many_heads": ("published shapes", ALL, "float32", {"large_shapes"}),
    "zoo_fast_path_noncausal": ("dtype and backend", ("CS",), "float32", {"causal_prefix[float32]"}),
    "zoo_half_ignores_padding": ("dtype and backend", ("NS", "NC"), "bfloat16", {"independence[bfloat16]",
                                                                                  "key_padding[bfloat16]"}),
    "zoo_detached_normaliser": ("gradient values", ALL, "float32", {"gradients"}),
    "zoo_backward_ignores_padding": ("gradient values", ("NS", "NC"), "float32", {"key_padding"}),
    "zoo_unmasked_batch_sum": ("batches without a mask", ("NS", "NC"), "float32", {"independence"}),
    "zoo_lengths_from_mask": ("padding not on the right", ALL, "float32", {"independence", "key_padding"}),
    "zoo_nan_empty_rows": ("rows that see no key", ALL, "float32", {"key_padding"}),
    "zoo_inplace_normalise": ("memory contract", ALL, "float32", {"determinism"}),
    "zoo_reused_output": ("memory contract", ALL, "float32", {"determinism"}),
    "zoo_no_max_subtraction": ("large logits", ALL, "float32", {"large_logits", "key_padding[float32]"}),
    "zoo_shared_leaky_reference": ("references sharing code", ("CS",), "float32", {"causal_prefix"}),
    "zoo_dropout_in_eval": ("misattributed failures", ALL, "float32", {"independence"}),
    "zoo_mutates_values": ("misattributed failures", ALL, "float32", {"determinism"}),
}
