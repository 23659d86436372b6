"""The attention under test: its spec, the modules built from it, the inputs it is fed, the dtypes the checks
run in, and batched calls that stack several variants of an input into one forward.

A module is built once per (heads, head dimension), right after seeding the device's generator with `seed`,
and every forward call is preceded by the same reseed, so random-feature or sampling attentions see the same
randomness in every call of a check (randomness must therefore not depend on the batch size or length of a
call: the padding check compares batches of 2 with single elements, the causal checks prefixes, and the
batched checks stack copies of the inputs along the batch). Copies in other dtypes are deep copies of that
one module (same parameters and buffers).

Two dtypes matter: the structural dtype (float64 when the attention runs in it: the tight check) and the
requested dtype (the one a benchmark or a task would run). Checks that compare a computation with itself on
other inputs run in both; `check_dtypes()` lists them.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import torch

from cab.attention.base import Attention
from cab.check.compare import structural_tolerance
from cab.failures import CellTimeout
from cab.patterns import Pattern
from cab.registry import AttentionSpec, create_attention

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Batched checks stack copies of an input along the batch; a call holds at most this many (batch x head x
# token) rows, so a copy of a long sequence runs alone and the stacking never multiplies a large footprint.
COPY_ROWS = 1 << 16


@dataclass(frozen=True)
class Shape:
    """Input sizes of one forward call (Dv = Dk = head_dim)."""

    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    head_dim: int
    label: str = "main"

    def describe(self) -> str:
        return f"B={self.batch} Hq={self.heads} Hkv={self.kv_heads} Lq={self.lq} Lk={self.lk} D={self.head_dim}"

    def to_dict(self) -> dict:
        return {"label": self.label, "batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads,
                "lq": self.lq, "lk": self.lk, "head_dim": self.head_dim}


def main_shape(pattern: Pattern) -> Shape:
    """The small shape most checks use; cross patterns get Lq > Lk (odd_shapes covers Lq < Lk)."""
    return Shape(2, 4, 4, 48, 32 if pattern.cross else 48, 32)


def large_shapes(pattern: Pattern, gqa: bool) -> "list[Shape]":
    """The fixed suite's large shapes, probed like a published configuration: a long one (a length past 1,024
    that 64, 128, 256 and 512 divide, so rows past 512 and second tiles exist; head dim 64; one element, its
    cost being the length) and a wide one
    (8 heads, grouped 8/2 when the attention declares grouped-query heads; head dim 128; batch 2)."""
    lq, lk = (1536, 1088) if pattern.cross else (1536, 1536)
    wide_lq, wide_lk = (128, 192) if pattern.cross else (128, 128)
    return [
        Shape(1, 2, 2, lq, lk, 64, "long"),
        Shape(2, 8, 2 if gqa else 8, wide_lq, wide_lk, 128, "wide"),
    ]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


Inputs = "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]"  # q, k, v, key_padding_mask


class Subject:
    """One registered attention under test for one pattern, device, dtype and seed."""

    def __init__(self, spec: AttentionSpec, pattern: Pattern, hparams: dict, device: str, dtype: torch.dtype,
                 seed: int):
        self.spec, self.pattern, self.hparams = spec, pattern, dict(hparams)
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.main = main_shape(pattern)
        self.main_output: "torch.Tensor | None" = None  # set by the forward check
        self._built: dict[tuple[int, int], Attention] = {}
        self._cast: dict[tuple[int, int, torch.dtype], Attention] = {}
        self._truth: dict[tuple, Attention] = {}
        self.memo: dict = {}  # results several checks share (the reference's outputs and gradients)
        self._structural: "tuple[torch.dtype, str] | None" = None
        self.backends: dict[str, str] = {}  # dtype name -> the backend the module reported after a call
        self.stochastic = ""  # set by the determinism check when outputs vary between unreseeded calls
        self.not_run: dict[str, str] = {}  # checks (or parts) a check could not run here, and why

    # modules ----------------------------------------------------------------------------------------

    def reseed(self) -> None:
        """Seed the generators a module on this device draws from (torch.manual_seed would also seed every
        other backend, recording a stack trace each time: a millisecond per forward call)."""
        torch.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)

    def module(self, head_dim: int, dtype: torch.dtype, heads: "int | None" = None) -> Attention:
        """The module for (`heads`, `head_dim`) in `dtype` (built once per size, seeded; cast copies cached).
        `heads` defaults to the main shape's."""
        heads = heads or self.main.heads
        size = (heads, head_dim)
        if size not in self._built:
            self.reseed()
            module = create_attention(self.spec.name, self.pattern, heads, head_dim, **self.hparams)
            self._built[size] = module.to(self.device)
        key = (heads, head_dim, dtype)
        if key not in self._cast:
            self._cast[key] = copy.deepcopy(self._built[size]).to(dtype)
        return self._cast[key]

    def module_for(self, shape: Shape, dtype: torch.dtype) -> Attention:
        return self.module(shape.head_dim, dtype, shape.heads)

    def truth_for(self, shape: Shape, dtype: torch.dtype, truth: torch.dtype) -> Attention:
        """The module of `shape` in `truth`, with the parameters and buffers of its `dtype` copy (rounded to
        `dtype`, then converted exactly): what a check compares a lower-precision run with, so that only the
        arithmetic differs, not the parameter values. When `dtype` holds the built module's values exactly (a
        module built in float32, checked in float32), that is the `truth` module itself."""
        if truth == dtype or self._lossless(shape, dtype):
            return self.module_for(shape, truth)
        key = (shape.heads, shape.head_dim, dtype, truth)
        if key not in self._truth:
            self._truth[key] = copy.deepcopy(self.module_for(shape, dtype)).to(truth)
        return self._truth[key]

    def _lossless(self, shape: Shape, dtype: torch.dtype) -> bool:
        """Whether every floating parameter and buffer of the built module is exactly representable in `dtype`."""
        self.module_for(shape, dtype)
        built = self._built[(shape.heads, shape.head_dim)]
        tensors = [t for t in list(built.parameters()) + list(built.buffers()) if t.is_floating_point()]
        return all(t.dtype == dtype or torch.equal(t.detach().to(dtype).to(t.dtype), t.detach()) for t in tensors)

    def run(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_padding_mask: "torch.Tensor | None" = None, segment_ids: "torch.Tensor | None" = None,
            ) -> torch.Tensor:
        """One forward call, reseeded so that any sampling inside it repeats exactly (segment_ids, passed
        only when given, is for attentions declaring supports_segments)."""
        self.reseed()
        kwargs = {}
        if key_padding_mask is not None:
            kwargs["key_padding_mask"] = key_padding_mask
        if segment_ids is not None:
            kwargs["segment_ids"] = segment_ids
        out = module(q, k, v, **kwargs)
        self.backends.setdefault(dtype_name(q.dtype), str(getattr(module, "backend", "torch")))
        return out

    def run_reference(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """The module's own naive formulation on the same inputs, reseeded like `run`."""
        self.reseed()
        if key_padding_mask is None:
            return module.reference(q, k, v)
        return module.reference(q, k, v, key_padding_mask=key_padding_mask)

    def run_copies(self, module: Attention, copies: "list[tuple]") -> "list[torch.Tensor]":
        """The outputs of several (q, k, v, key_padding_mask) variants of one shape, stacked along the batch
        into as few calls as COPY_ROWS allows (the attention's batch elements are independent: the
        independence check holds it to that before any batched check runs), one call each for an attention
        that compiles per shape. Every copy must have a mask or none must, so all of them take the same path
        through the attention."""
        if not copies:
            return []
        masked = {c[3] is not None for c in copies}
        if len(masked) != 1:
            raise ValueError("run_copies needs every copy with a key padding mask or none with one")
        q0 = copies[0][0]
        rows = q0.shape[0] * q0.shape[1] * max(q0.shape[-2], copies[0][1].shape[-2])
        per_call = 1 if getattr(module, "compiles_per_shape", False) else max(1, COPY_ROWS // max(1, rows))
        outs: list[torch.Tensor] = []
        for start in range(0, len(copies), per_call):
            group = copies[start:start + per_call]
            stacked = [torch.cat([c[i] for c in group]) for i in range(3)]
            mask = torch.cat([c[3] for c in group]) if masked == {True} else None
            out = self.run(module, *stacked, key_padding_mask=mask)
            outs += list(out.split([c[0].shape[0] for c in group]))
        return outs

    # inputs -----------------------------------------------------------------------------------------

    def randn(self, size: "tuple[int, ...]", dtype: torch.dtype, salt: str, scale: float = 1.0) -> torch.Tensor:
        """Standard normal values from a generator seeded by (seed, salt): the same on every device. Drawn in
        float32 (torch draws float64 normals five times slower; the checks need values, not their precision)."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{salt}".encode()))
        values = torch.randn(size, generator=generator, dtype=torch.float32) * scale
        return values.to(device=self.device, dtype=dtype)

    def inputs(self, shape: Shape, dtype: torch.dtype, salt: str, requires_grad: bool = False,
               ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) as fresh leaf tensors."""
        q = self.randn((shape.batch, shape.heads, shape.lq, shape.head_dim), dtype, f"{salt}:q")
        k = self.randn((shape.batch, shape.kv_heads, shape.lk, shape.head_dim), dtype, f"{salt}:k")
        v = self.randn((shape.batch, shape.kv_heads, shape.lk, shape.head_dim), dtype, f"{salt}:v")
        return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))

    # dtypes -----------------------------------------------------------------------------------------

    def structural(self) -> "tuple[torch.dtype, str]":
        """(dtype, note) for the tight structural checks: float64 when the attention runs in it, else
        float32, else the requested dtype; the note says why a fallback was taken and what tolerance it
        implies (it appears in every check message and in the verdict's coverage)."""
        if self._structural is None:
            self._structural = self._probe_structural()
        return self._structural

    def check_dtypes(self) -> "list[torch.dtype]":
        """The dtypes the structural checks run in: the structural one, then the requested one."""
        return list(dict.fromkeys([self.structural()[0], self.dtype]))

    def _probe_structural(self) -> "tuple[torch.dtype, str]":
        candidates = list(dict.fromkeys([torch.float64, torch.float32, self.dtype]))
        failures = []
        for dtype in candidates:
            reason = self._cannot_run(dtype)
            if reason is None:
                if not failures:
                    return dtype, ""
                tolerance = structural_tolerance(dtype)
                return dtype, f"{'; '.join(failures)}: compared in {dtype_name(dtype)} (tolerance {tolerance:.0e})"
            failures.append(f"{dtype_name(dtype)} unsupported ({reason})")
        return self.dtype, "; ".join(failures)

    def _cannot_run(self, dtype: torch.dtype) -> "str | None":
        """Why the attention fails to run in `dtype` on the main shape (None when it runs)."""
        try:
            module = self.module(self.main.head_dim, dtype)
            q, k, v = self.inputs(self.main, dtype, "probe")
            with torch.no_grad():
                out = self.run(module, q, k, v)
        except CellTimeout:
            raise
        except (Exception, SystemExit) as exc:  # any failure means "not this dtype"; the checks report real failures
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if not isinstance(out, torch.Tensor) or out.dtype != dtype:
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            return f"returned {got}"
        return None


def rows_after(x: torch.Tensor, split: int, other: torch.Tensor) -> torch.Tensor:
    """x with its rows (sequence dim -2) after `split` taken from `other`."""
    return torch.cat([x[..., : split + 1, :], other[..., split + 1:, :]], dim=-2)


def sample_splits(length: int, count: int, salt: int = 0) -> "list[int]":
    """Up to `count` split points for a sequence of `length` rows (rows <= split are compared, later ones
    perturbed): the one before the last row, one just past 512 (inside a 64-row tile, off its edge) when the
    length allows, the rest drawn from a generator seeded by the length; distinct, sorted, in [0, length-2]."""
    if length < 2:
        return []
    chosen = [length - 2] + ([517] if length > 520 else [])
    generator = torch.Generator().manual_seed(length * 7919 + salt)
    for index in torch.randperm(length - 1, generator=generator).tolist():
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen[:max(count, 1)])
