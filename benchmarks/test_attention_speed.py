"""pytest-benchmark timings of the three exact attentions (run: `pytest benchmarks --benchmark-only`).

Not part of the unit tests: these measure, they assert nothing about speed. Each benchmark times one
forward (or forward + backward) of a built attention on inputs made outside the timed region."""

from __future__ import annotations

import pytest
import torch

from cab.bench import make_inputs
from cab.bench.workload import build_attention, prepare_mode
from cab.cells import Cell

ATTENTIONS = ("vanilla", "sdpa", "memory_efficient")
LENGTHS = (256, 1024)


def _cell(attention: str, pattern: str, length: int, mode: str) -> Cell:
    return Cell(kind="bench", attention=attention, pattern=pattern, batch=1, heads=4, kv_heads=4, lq=length,
                lk=length, head_dim=64, mode=mode, device="cuda" if torch.cuda.is_available() else "cpu")


def _run(benchmark, attention: str, pattern: str, length: int, mode: str) -> None:
    cell = _cell(attention, pattern, length, mode)
    attn = build_attention(cell)
    fn, before_sample = prepare_mode(attn, make_inputs(cell, requires_grad=mode != "fwd_infer"), mode)
    sync = torch.cuda.synchronize if cell.device == "cuda" else (lambda: None)

    def call() -> None:
        fn()
        sync()

    if before_sample is None:
        benchmark(call)
    else:  # reset gradients outside the timed region, one call per round
        benchmark.pedantic(call, setup=before_sample, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(attention=attention, pattern=pattern, length=length, mode=mode, device=cell.device,
                                threads=torch.get_num_threads())


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_inference(benchmark, attention, length):
    _run(benchmark, attention, "NS", length, "fwd_infer")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_forward_backward(benchmark, attention, length):
    _run(benchmark, attention, "CS", length, "fwdbwd")
