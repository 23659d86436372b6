"""cab against CAB's own modules (vendored in benchmarks/third_party/cab): the same math, then timings.

    .venv/bin/pytest benchmarks/test_vs_cab.py                    # same-math checks + pytest-benchmark timings
    .venv/bin/python benchmarks/vs_cab.py --check                  # interleaved ratios, exit 1 above 1.05

Not part of the unit tests. The same-math tests hold each adapter in vs_cab.py to computing what CAB computes
(float64, several shapes), so the timings compare like with like; the benchmarks time each side alone on one
thread, grouped per attention and length. The ratio that must stay <= 1.05 comes from vs_cab.py, whose
interleaved rounds keep a change of machine load from landing on one side only."""

from __future__ import annotations

import pytest
import torch
import vs_cab

SHAPES = [(1, 8, 1024, 64), (2, 4, 256, 32), (1, 2, 48, 16)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(vs_cab.PAIRS))
def test_cab_and_cab_compute_the_same(name, shape):
    batch, heads, length, dim = shape
    assert vs_cab.check_equivalence(vs_cab.PAIRS[name](heads, dim), batch, heads, length, dim) <= 1e-9


def test_a_changed_adapter_is_caught():
    """The check has teeth: nystromformer without the d^(1/4) input mapping (CAB's q.k / d scores) differs."""
    pair = vs_cab.PAIRS["nystromformer"](4, 16)
    pair.ref_inputs = lambda q, k, v: (q, k, v)
    with pytest.raises(AssertionError, match="differ"):
        vs_cab.check_equivalence(pair, 1, 4, 64, 16)


def test_the_check_flag_fails_when_cab_is_slower(monkeypatch, capsys):
    """--check turns a ratio above --max-ratio into exit status 1 (timings replaced by fixed ones here)."""
    def measure(names, length, *args, **kwargs):
        return [vs_cab.Row(name, length, cab=[2.0, 2.1, 2.2], ref=[1.0, 1.0, 1.0]) for name in names]

    monkeypatch.setattr(vs_cab, "measure", measure)
    monkeypatch.setattr(vs_cab, "check_equivalence", lambda *args, **kwargs: 0.0)
    assert vs_cab.main(["abc", "--lengths", "64", "--threads", "1"]) == 0
    assert vs_cab.main(["abc", "--lengths", "64", "--threads", "1", "--check"]) == 1
    assert "abc L=64: 2.100" in capsys.readouterr().out


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("side", ["cab", "CAB"])
@pytest.mark.parametrize("name", list(vs_cab.PAIRS))
def test_forward(benchmark, one_thread, name, side, length):
    pair = vs_cab.PAIRS[name](8, 64)
    q, k, v = vs_cab.inputs(1, 8, length, 64, torch.float32)
    fn = pair.cab if side == "cab" else pair.ref

    def call():
        with torch.no_grad():
            fn(q, k, v)

    benchmark.group = f"{name} L={length}"
    benchmark.extra_info.update(attention=name, implementation=side, length=length, threads=1)
    benchmark(call)
