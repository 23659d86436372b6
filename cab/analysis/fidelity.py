"""Fidelity of an attention, as two separate numbers.

- Numeric deviation (`numeric_deviation`): how far the attention run in float32, bfloat16 or float16 is
  from the same attention in float64 (for exact attentions: the float64 oracle), for the output and the
  gradients of q, k and v, beside the deviation of plain eager attention in the same dtype from the oracle
  as the yardstick ("Is Flash Attention Stable?" found FlashAttention at about 10x eager's in bf16).
- Approximation error (`approximation_error`): the relative RMSE of the attention's output against exact
  softmax attention on the same inputs, computed in float64 (float32 when the attention cannot run in
  float64), so it measures the approximation and not rounding; on random inputs and on structured ones
  where every query has a few dominant matching keys (where low-rank and kernel approximations suffer).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from cab.check.oracle import eager_attention, oracle_attention
from cab.patterns import Pattern
from cab.registry import create_attention, get_spec

DEVIATION_DTYPES = ("float32", "bfloat16", "float16")
INPUT_KINDS = ("random", "structured")


@dataclass(frozen=True)
class Shape:
    """Input sizes (Dv = Dk = head_dim)."""

    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    lq: int = 128
    lk: int = 128
    head_dim: int = 32


@dataclass(frozen=True)
class Deviation:
    """Max-abs deviation of one tensor ("output", "dq", "dk", "dv") in `dtype` from its float64 reference,
    and eager exact attention's deviation from the oracle in that dtype; `ratio` = error / eager_error.
    `message` says why a dtype could not be measured (error is then None)."""

    dtype: str
    tensor: str
    error: "float | None"
    eager_error: "float | None"
    reference: str
    message: str = ""

    @property
    def ratio(self) -> "float | None":
        if self.error is None or not self.eager_error:
            return None
        return self.error / self.eager_error


def _draw(shape: Shape, seed: int, device: torch.device) -> "tuple[torch.Tensor, ...]":
    generator = torch.Generator().manual_seed(seed)
    sizes = [
        (shape.batch, shape.heads, shape.lq, shape.head_dim),
        (shape.batch, shape.kv_heads, shape.lk, shape.head_dim),
        (shape.batch, shape.kv_heads, shape.lk, shape.head_dim),
        (shape.batch, shape.heads, shape.lq, shape.head_dim),
    ]
    return tuple(torch.randn(s, generator=generator, dtype=torch.float64).to(device) for s in sizes)


def _build(attention: str, pattern: Pattern, hparams: dict, shape: Shape, seed: int, device: torch.device):
    torch.manual_seed(seed)
    return create_attention(attention, pattern, shape.heads, shape.head_dim, **hparams).to(device)


def _output_and_grads(fn, q, k, v, dout, dtype: torch.dtype, seed: int) -> "dict[str, torch.Tensor | None]":
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype), allow_unused=True)
    return {"output": out.detach(), **{f"d{n}": g for n, g in zip("qkv", grads)}}


def _max_abs(a: "torch.Tensor | None", b: "torch.Tensor | None") -> "float | None":
    if a is None or b is None:
        return None
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def numeric_deviation(
    attention: str,
    pattern: "Pattern | str",
    *,
    dtypes: "tuple[str, ...]" = DEVIATION_DTYPES,
    hparams: "dict | None" = None,
    shape: Shape = Shape(),
    seed: int = 0,
    device: str = "cpu",
) -> "list[Deviation]":
    """The deviation of every tensor in every dtype (see the module docstring)."""
    pattern, hparams, dev = Pattern.parse(pattern), dict(hparams or {}), torch.device(device)
    exact = get_spec(attention).exact
    module = _build(attention, pattern, hparams, shape, seed, dev)
    q, k, v, dout = _draw(shape, seed, dev)
    oracle = _output_and_grads(lambda *a: oracle_attention(*a, pattern), q, k, v, dout, torch.float64, seed)
    if exact:
        reference, reference_name = oracle, "float64 oracle"
    else:
        double = copy.deepcopy(module).to(torch.float64)
        reference = _output_and_grads(double, q, k, v, dout, torch.float64, seed)
        reference_name = "own float64 forward"
    results = []
    for name in dtypes:
        dtype = getattr(torch, name)
        eager = _output_and_grads(lambda *a: eager_attention(*a, pattern), q, k, v, dout, dtype, seed)
        try:
            got = _output_and_grads(copy.deepcopy(module).to(dtype), q, k, v, dout, dtype, seed)
        except (Exception, SystemExit) as exc:  # a dtype the attention cannot run in is a finding, not a crash
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            results += [Deviation(name, t, None, _max_abs(eager[t], oracle[t]), reference_name, message)
                        for t in oracle]
            continue
        for tensor in oracle:
            results.append(Deviation(name, tensor, _max_abs(got[tensor], reference[tensor]),
                                     _max_abs(eager[tensor], oracle[tensor]), reference_name,
                                     "" if got[tensor] is not None else "no gradient reaches this input"))
    return results


def structured_inputs(shape: Shape, pattern: "Pattern | str", *, matches: int = 2, logit: float = 8.0,
                      seed: int = 0) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """float64 q, k, v where every query is the sum of `matches` keys it may see (chosen at random) scaled
    so each matching score is about `logit`, plus a little noise: a few dominant matches per query."""
    pattern = Pattern.parse(pattern)
    generator = torch.Generator().manual_seed(seed)
    b, h, hkv, lq, lk, d = shape.batch, shape.heads, shape.kv_heads, shape.lq, shape.lk, shape.head_dim
    k = torch.randn(b, hkv, lk, d, generator=generator, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=generator, dtype=torch.float64)
    k_per_head = k.repeat_interleave(h // hkv, dim=1)
    rows = torch.arange(lq)
    visible = (rows + (lk - lq) + 1).clamp(1, lk) if pattern is Pattern.CS else torch.full((lq,), lk)
    picks = (torch.rand(b, h, lq, matches, generator=generator, dtype=torch.float64) * visible[:, None]).long()
    chosen = torch.gather(k_per_head.unsqueeze(2).expand(b, h, lq, lk, d), 3,
                          picks.unsqueeze(-1).expand(b, h, lq, matches, d))  # (b, h, lq, matches, d)
    scale = logit * math.sqrt(d) / d  # q.k ~ scale * |k|^2 / sqrt(d) ~ logit
    noise = 0.1 * torch.randn(b, h, lq, d, generator=generator, dtype=torch.float64)
    return scale * chosen.sum(dim=3) + noise, k, v


@dataclass(frozen=True)
class ApproximationError:
    """Relative RMSE of the output against exact softmax attention, the inputs it was measured on and the
    dtype the attention ran in."""

    attention: str
    pattern: str
    inputs: str
    relative_rmse: float
    dtype: str


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """sqrt(mean((actual - expected)^2)) / sqrt(mean(expected^2)), in float64."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    return float(torch.sqrt(torch.mean((actual - expected) ** 2)) / torch.sqrt(torch.mean(expected ** 2)))


def approximation_error(
    attention: str,
    pattern: "Pattern | str",
    *,
    inputs: str = "random",
    hparams: "dict | None" = None,
    shape: Shape = Shape(),
    seed: int = 0,
    device: str = "cpu",
) -> ApproximationError:
    """The approximation error on "random" (standard normal) or "structured" inputs."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs must be one of {', '.join(INPUT_KINDS)}, got {inputs!r}")
    pattern, dev = Pattern.parse(pattern), torch.device(device)
    module = _build(attention, pattern, dict(hparams or {}), shape, seed, dev)
    if inputs == "random":
        q, k, v, _ = _draw(shape, seed, dev)
    else:
        q, k, v = (t.to(dev) for t in structured_inputs(shape, pattern, seed=seed))
    exact = oracle_attention(q, k, v, pattern)

    def run(dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            torch.manual_seed(seed)
            return copy.deepcopy(module).to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype))

    try:
        out = run(torch.float64)
    except (Exception, SystemExit):  # an attention that cannot run in float64 is measured in float32
        out = run(torch.float32)
    return ApproximationError(attention, pattern.value, inputs, relative_rmse(out, exact), str(out.dtype)[6:])
