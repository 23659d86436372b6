"""The attention under test: its spec, the modules built from it, the inputs it is fed and the dtype the
structural checks run in.

A module is built once per head dimension, right after seeding the device's generator with `seed`, and
every forward call is preceded by the same reseed, so random-feature or sampling attentions see the same
randomness in every call of a check (randomness must therefore not depend on the batch size or length of
a call: the padding check compares batches of 2 with single elements, the causal checks prefixes).
Copies in other dtypes are deep copies of that one module (same parameters and buffers).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import torch

from cab.attention.base import Attention
from cab.check.compare import structural_tolerance
from cab.patterns import Pattern
from cab.registry import AttentionSpec, create_attention
from cab.runner import CellTimeout

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def main_shape(pattern: Pattern) -> Shape:
    """The small shape most checks use; cross patterns get Lq > Lk (odd_shapes covers Lq < Lk)."""
    return Shape(2, 4, 4, 48, 32 if pattern.cross else 48, 32)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Subject:
    """One registered attention under test for one pattern, device, dtype and seed."""

    def __init__(self, spec: AttentionSpec, pattern: Pattern, hparams: dict, device: str, dtype: torch.dtype,
                 seed: int):
        self.spec, self.pattern, self.hparams = spec, pattern, dict(hparams)
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.main = main_shape(pattern)
        self.main_output: "torch.Tensor | None" = None  # set by the forward check
        self._built: dict[int, Attention] = {}
        self._cast: dict[tuple[int, torch.dtype], Attention] = {}
        self._structural: "tuple[torch.dtype, str] | None" = None

    # modules ----------------------------------------------------------------------------------------

    def reseed(self) -> None:
        """Seed the generators a module on this device draws from (torch.manual_seed would also seed every
        other backend, recording a stack trace each time: a millisecond per forward call)."""
        torch.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(self.seed)

    def module(self, head_dim: int, dtype: torch.dtype) -> Attention:
        """The module for `head_dim` in `dtype` (built once per head dim, seeded; cast copies cached)."""
        if head_dim not in self._built:
            self.reseed()
            module = create_attention(self.spec.name, self.pattern, self.main.heads, head_dim, **self.hparams)
            self._built[head_dim] = module.to(self.device)
        key = (head_dim, dtype)
        if key not in self._cast:
            self._cast[key] = copy.deepcopy(self._built[head_dim]).to(dtype)
        return self._cast[key]

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
        return module(q, k, v, **kwargs)

    def run_reference(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The module's own naive formulation on the same inputs, reseeded like `run`."""
        self.reseed()
        return module.reference(q, k, v)

    # inputs -----------------------------------------------------------------------------------------

    def randn(self, size: "tuple[int, ...]", dtype: torch.dtype, salt: str, scale: float = 1.0) -> torch.Tensor:
        """Standard normal values from a generator seeded by (seed, salt): the same on every device."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{salt}".encode()))
        values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
        return values.to(device=self.device, dtype=dtype)

    def inputs(self, shape: Shape, dtype: torch.dtype, salt: str, requires_grad: bool = False,
               ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) as fresh leaf tensors."""
        q = self.randn((shape.batch, shape.heads, shape.lq, shape.head_dim), dtype, f"{salt}:q")
        k = self.randn((shape.batch, shape.kv_heads, shape.lk, shape.head_dim), dtype, f"{salt}:k")
        v = self.randn((shape.batch, shape.kv_heads, shape.lk, shape.head_dim), dtype, f"{salt}:v")
        return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))

    # structural dtype -------------------------------------------------------------------------------

    def structural(self) -> "tuple[torch.dtype, str]":
        """(dtype, note) for the structural checks: float64 when the attention runs in it, else float32,
        else the requested dtype; the note says why a fallback was taken and what tolerance it implies."""
        if self._structural is None:
            self._structural = self._probe_structural()
        return self._structural

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
        except Exception as exc:  # any failure means "not this dtype"; the checks report real failures
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if not isinstance(out, torch.Tensor) or out.dtype != dtype:
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            return f"returned {got}"
        return None
