"""cab's attentions side by side with CAB's own modules (Shark-NLP/CAB, vendored in benchmarks/third_party/cab).

    .venv/bin/python benchmarks/vs_cab.py                  # B=1, H=8, L=1024 and 4096, D=64, fp32, 1 thread
    .venv/bin/python benchmarks/vs_cab.py --check          # exit 1 when a ratio cab/CAB exceeds --max-ratio (1.05)

Only the attention core is compared, at the same (B, H, L, D) inputs: cab's `forward(q, k, v)` against CAB's
`_apply_attention` on the same tensors viewed as (B*H, L, D), without CAB's input and output projections.
Before timing, each pair is checked to compute the same thing in float64 on the timed shape (the adapters below
say what is mapped: parameters copied, inputs rescaled where the two scale scores differently), and a pair that
disagrees stops the run. Timings are interleaved: each round calls every implementation once in a shuffled
order, so a change of machine load hits both sides of a ratio alike; the figures are per-implementation medians
with p20/p80 over the rounds, the ratio is median(cab) / median(CAB), and beside it the p20..p80 of the
per-round ratios. Not part of the unit tests (`make test` runs `pytest tests`); the equivalence checks also
run as tests in benchmarks/test_vs_cab.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

VENDORED = Path(__file__).resolve().parent / "third_party" / "cab"


def efficient_attention():
    """CAB's `efficient_attention` package, vendored (MIT, see third_party/cab/README.md)."""
    if str(VENDORED) not in sys.path:
        sys.path.insert(0, str(VENDORED))
    import efficient_attention

    return efficient_attention


@dataclasses.dataclass
class Pair:
    """One attention in both implementations at one shape: `cab(q, k, v)` and `ref(q, k, v)` take and return
    (B, H, L, D) tensors; `ref_inputs` maps cab's inputs to the ones on which CAB computes the same output."""

    name: str
    ours: torch.nn.Module  # cab's attention
    theirs: torch.nn.Module  # CAB's module, in eval mode
    ref_inputs: Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"] = lambda q, k, v: (q, k, v)
    # whether CAB must see one head at a time to compute what cab computes (checks only, never timed)
    per_head_check: bool = False

    def cab(self, q, k, v):
        return self.ours(q, k, v)

    def ref(self, q, k, v):
        """CAB's attention core on (B, H, L, D) tensors: `_apply_attention` on (B*H, L, D) views."""
        b, h, length, d = q.shape
        out, _ = self.theirs._apply_attention(q.reshape(b * h, length, d), k.reshape(b * h, -1, d),
                                              v.reshape(b * h, -1, v.shape[-1]), b)
        return out.reshape(b, h, length, -1)

    def to(self, dtype: torch.dtype) -> "Pair":
        self.ours.to(dtype)
        self.theirs.to(dtype)
        return self


def make_abc(heads: int, dim: int, slots: int = 16) -> Pair:
    """Same math (NS): CAB's `compress_k`/`compress_v` are set to cab's `control_k`/`control_v`."""
    from cab.attention.abc_attention import ABCAttention

    ours = ABCAttention("NS", heads, dim, num_slots=slots)
    theirs = efficient_attention().ABC(embed_dim=heads * dim, num_heads=heads, num_landmarks=slots)
    with torch.no_grad():
        theirs.compress_k.copy_(ours.control_k)
        theirs.compress_v.copy_(ours.control_v)
    return Pair("abc", ours, theirs.eval())


def make_lara(heads: int, dim: int, landmarks: int = 16) -> Pair:
    """Same math (NS, eval mode, cab's default seed=None: samples w_c = mu_c, as CAB's eval mode) when
    L is a multiple of the landmarks: CAB's features scale the data by 1/sqrt(d) and the projection not at
    all, cab scales both by d^-1/4, which gives the same exponents (w.q / sqrt(d) - |q|^2 / (2 sqrt(d)))."""
    from cab.attention.lara import LaraAttention

    ours = LaraAttention("NS", heads, dim, num_landmarks=landmarks)
    theirs = efficient_attention().Lara(embed_dim=heads * dim, num_heads=heads, num_landmarks=landmarks)
    return Pair("lara", ours, theirs.eval())


def make_nystromformer(heads: int, dim: int, landmarks: int = 16) -> Pair:
    """Same math (NS, L a multiple of the landmarks) when CAB gets q and k times d^(1/4): CAB's scores are
    q.k / d, cab's q.k / sqrt(d), and the landmark means are linear. CAB starts the pseudo-inverse from one
    maximum over all (batch, head) matrices, cab per matrix: the check calls CAB one head at a time."""
    from cab.attention.nystromformer import NystromformerAttention

    ours = NystromformerAttention("NS", heads, dim, num_landmarks=landmarks)
    theirs = efficient_attention().NystromAttention(embed_dim=heads * dim, num_heads=heads, num_landmarks=landmarks)
    scale = dim ** 0.25
    return Pair("nystromformer", ours, theirs.eval(), lambda q, k, v: (q * scale, k * scale, v),
                per_head_check=True)


PAIRS: "dict[str, Callable[[int, int], Pair]]" = {
    "abc": make_abc,
    "lara": make_lara,
    "nystromformer": make_nystromformer,
}


def inputs(batch: int, heads: int, length: int, dim: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64).to(dtype)
                 for _ in range(3))


def max_relative_error(pair: Pair, q, k, v) -> float:
    """max |cab - CAB| / max |CAB| on these inputs, both run in their dtype (float64 for a check)."""
    with torch.no_grad():
        ours = pair.cab(q, k, v)
        rq, rk, rv = pair.ref_inputs(q, k, v)
        if pair.per_head_check:
            theirs = torch.cat([
                torch.cat([pair.ref(rq[b:b + 1, h:h + 1], rk[b:b + 1, h:h + 1], rv[b:b + 1, h:h + 1])
                           for h in range(q.shape[1])], dim=1)
                for b in range(q.shape[0])], dim=0)
        else:
            theirs = pair.ref(rq, rk, rv)
    return float((ours - theirs).abs().max() / theirs.abs().max())


def check_equivalence(pair: Pair, batch: int, heads: int, length: int, dim: int, tolerance: float = 1e-9) -> float:
    """Raise unless both implementations agree to `tolerance` in float64 at this shape; returns the error."""
    pair.to(torch.float64)
    try:
        error = max_relative_error(pair, *inputs(batch, heads, length, dim, torch.float64, seed=1))
    finally:
        pair.to(torch.float32)
    if not error <= tolerance:
        raise AssertionError(f"{pair.name}: cab and CAB differ by {error:.3g} (relative, float64) at "
                             f"B={batch} H={heads} L={length} D={dim}; the comparison would time different math")
    return error


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quantile(xs: "list[float]", p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]


@dataclasses.dataclass
class Row:
    name: str
    length: int
    cab: "list[float]"
    ref: "list[float]"

    @property
    def ratio(self) -> float:
        return statistics.median(self.cab) / statistics.median(self.ref)

    @property
    def paired(self) -> "list[float]":
        return [a / b for a, b in zip(self.cab, self.ref)]


def measure(names: "list[str]", length: int, rounds: int, warmup: int, batch: int = 1, heads: int = 8,
            dim: int = 64, mode: str = "fwd", seed: int = 0) -> "list[Row]":
    """Interleaved timings (seconds) of every pair at one length: each round runs every (pair, side) once in a
    shuffled order."""
    pairs = [PAIRS[name](heads, dim) for name in names]
    q, k, v = inputs(batch, heads, length, dim, torch.float32, seed)
    if mode == "fwdbwd":
        q, k, v = (x.requires_grad_() for x in (q, k, v))

    def call(fn) -> Callable[[], object]:
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    fn(q, k, v)
        else:
            def run():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).sum().backward()
        return run

    jobs = [(i, side, call(getattr(pair, side))) for i, pair in enumerate(pairs) for side in ("cab", "ref")]
    times = {(i, side): [] for i, side, _ in jobs}
    order = random.Random(seed)
    for r in range(warmup + rounds):
        order.shuffle(jobs)
        for i, side, run in jobs:
            elapsed = _timed(run)
            if r >= warmup:
                times[(i, side)].append(elapsed)
    return [Row(pair.name, length, times[(i, "cab")], times[(i, "ref")]) for i, pair in enumerate(pairs)]


def _ms(xs: "list[float]") -> str:
    return f"{statistics.median(xs) * 1e3:8.2f} [{quantile(xs, 0.2) * 1e3:.2f}, {quantile(xs, 0.8) * 1e3:.2f}]"


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attentions", nargs="*", default=list(PAIRS), help=f"default: all ({', '.join(PAIRS)})")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio exceeds --max-ratio")
    parser.add_argument("--max-ratio", type=float, default=1.05)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.attentions) - set(PAIRS))
    if unknown:
        parser.error(f"unknown attention(s) {unknown}; known: {', '.join(PAIRS)}")
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"B={args.batch} H={args.heads} D={args.head_dim} fp32 threads={args.threads} mode={args.mode} "
          f"rounds={args.rounds} torch {torch.__version__}; load average (1 min) {load:.2f}")
    for length in lengths:  # the math first, at every timed shape
        for name in args.attentions:
            error = check_equivalence(PAIRS[name](args.heads, args.head_dim), args.batch, args.heads, length,
                                      args.head_dim)
            print(f"  same math: {name} L={length}: max relative difference {error:.1e} (float64)")
    print(f"{'attention':<14}{'L':>6}  {'cab ms median [p20, p80]':<28}{'CAB ms median [p20, p80]':<28}"
          f"{'cab/CAB':>8}  per-round p20..p80")
    failed = []
    for length in lengths:
        for row in measure(args.attentions, length, args.rounds, args.warmup, args.batch, args.heads,
                           args.head_dim, args.mode):
            paired = row.paired
            flag = ""
            if row.ratio > args.max_ratio:
                flag = f"  > {args.max_ratio}"
                failed.append(f"{row.name} L={length}: {row.ratio:.3f}")
            print(f"{row.name:<14}{length:>6}  {_ms(row.cab):<28}{_ms(row.ref):<28}{row.ratio:>8.3f}  "
                  f"{quantile(paired, 0.2):.3f}..{quantile(paired, 0.8):.3f}{flag}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at the end {load:.2f}")
    if failed and args.check:
        print(f"cab is slower than CAB beyond {args.max_ratio}x: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
