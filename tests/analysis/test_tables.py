"""Efficiency-length and exponent tables from a results store: curves per attention and configuration,
repeated measurements (trials, seeds) pooled, failed baseline lengths reported, theoretical exponents beside
fitted ones, text output."""

import numpy as np
import pytest

from cab.analysis import (
    bench_curves,
    complexity_exponent,
    decode_table,
    efficiency_length,
    efficiency_table,
    exponent_table,
    format_decode,
    format_efficiency,
    format_exponents,
    throughput_table,
)
from cab.cells import Cell, Result
from cab.status import Status
from cab.store import ResultStore

LENGTHS = [256, 512, 1024, 2048]
COST = {  # ms per call and bytes, by attention: quadratic baselines, a linear attention crossing them
    "vanilla": (lambda n: 4e-6 * n ** 2, lambda n: 16 * n ** 2),
    "sdpa": (lambda n: 1e-6 * n ** 2, lambda n: 4096 * n),
    "local": (lambda n: 1.5e-3 * n, lambda n: 2048 * n),
}


def _samples(center: float, seed: int) -> list:
    return (center * np.exp(np.random.default_rng(seed).normal(0, 0.02, 12))).tolist()


def _result(name: str, length: int, seed: int, repeat: int = 0, status: Status = Status.OK, pattern: str = "NS"):
    cell = Cell(kind="bench", attention=name, pattern=pattern, batch=1, heads=8, kv_heads=8, lq=length, lk=length,
                head_dim=64, mode="fwd", seed=repeat)
    if status is not Status.OK:
        return Result(cell, status, message=f"{status.value} at {length}")
    time, memory = COST[name]
    samples = _samples(time(length), seed)
    metrics = {"samples_ms": samples, "median_ms": float(np.median(samples)), "mem_status": "ok",
               "peak_mem_bytes": memory(length), "flops": 4 * 8 * length * length * 64}
    return Result(cell, Status.OK, metrics=metrics, provenance={"device_name": "NVIDIA H100 80GB HBM3"})


@pytest.fixture()
def frame(tmp_path):
    with ResultStore(tmp_path / "cab.sqlite") as store:
        for i, name in enumerate(COST):
            for j, n in enumerate(LENGTHS):
                store.put(_result(name, n, seed=10 * i + j))
            store.put(_result(name, 512, seed=99 + i, repeat=1))  # a repeat of one length (another key)
        store.put(_result("vanilla", 4096, seed=0, status=Status.OOM))
        store.put(_result("local", 4096, seed=5))
        store.put(_result("local", 256, seed=6, pattern="CS"))
        for context in (1024, 64):
            store.put(_decode_result(context))
        store.put(Result(Cell(kind="bench", attention="flash", pattern="NS", lq=256, lk=256, mode="fwd"),
                         Status.UNSUPPORTED, message="needs CUDA"))
        return store.dataframe()


def _decode_result(context: int) -> Result:
    cell = Cell(kind="bench", attention="sdpa", pattern="CS", batch=1, heads=8, kv_heads=2, lq=context, lk=context,
                head_dim=64, mode="decode")
    metrics = {"samples_ms": [0.1, 0.2, 0.3], "median_ms": 0.2, "p20_ms": 0.14, "p80_ms": 0.26, "context": context,
               "tokens_per_s": 5000.0, "state_bytes": 2 * 2 * context * 64 * 4}
    return Result(cell, Status.OK, metrics=metrics)


def test_curves_pool_repeats_and_keep_failures(frame):
    curves = {(c.label, c.config[0]): c for c in bench_curves(frame, "time")}
    vanilla = curves[("vanilla", "NS")]
    assert vanilla.lengths == LENGTHS and vanilla.failed == {4096: "oom"}
    assert len(vanilla.points[512]) == 24 and len(vanilla.points[256]) == 12  # both rows of 512 pooled
    assert curves[("local", "NS")].lengths == LENGTHS + [4096]
    assert ("local", "CS") in curves


def test_efficiency_table_matches_direct_computation(frame):
    table = efficiency_table(frame, n_boot=200, seed=3)
    ns = table[table["pattern"] == "NS"]
    assert set(zip(ns["attention"], ns["baseline"], ns["metric"])) == {
        (a, b, m) for m in ("time", "memory") for b in ("sdpa", "vanilla") for a in COST if a != b}
    row = ns[(ns["attention"] == "local") & (ns["baseline"] == "vanilla") & (ns["metric"] == "time")].iloc[0]
    curves = {c.label: c for c in bench_curves(frame, "time") if c.config[0] == "NS"}
    direct = efficiency_length(LENGTHS, curves["vanilla"].values(LENGTHS), curves["local"].values(LENGTHS),
                               n_boot=200, seed=3)
    assert row["outcome"] == "crosses" and row["length"] == pytest.approx(direct.length)
    assert (row["low"], row["high"]) == pytest.approx((direct.low, direct.high))
    assert 375 - 20 < row["length"] < 375 + 20  # 4e-6 n^2 = 1.5e-3 n at n = 375
    assert row["baseline_fails_from"] == 4096 and row["baseline_status"] == "oom"
    vs_sdpa = ns[(ns["attention"] == "local") & (ns["baseline"] == "sdpa") & (ns["metric"] == "time")].iloc[0]
    assert vs_sdpa["length"] == pytest.approx(1500, rel=0.05) and vs_sdpa["first_cheaper"] == 2048
    memory = ns[(ns["attention"] == "local") & (ns["baseline"] == "vanilla") & (ns["metric"] == "memory")].iloc[0]
    assert memory["outcome"] == "always_cheaper"  # 2048 n < 16 n^2 from n = 128
    cs = table[table["pattern"] == "CS"]
    assert cs.empty  # no baseline measured in CS


def test_cab_method_table(frame):
    table = efficiency_table(frame, method="cab", baselines=("vanilla",), metrics=("memory",))
    row = table[(table["attention"] == "sdpa") & (table["pattern"] == "NS")].iloc[0]
    assert row["length"] == pytest.approx(256.0, rel=1e-6)  # 16 n^2 = 4096 n


def test_exponent_table(frame):
    table = exponent_table(frame, n_boot=200)

    def row(a, m):
        return table[(table["attention"] == a) & (table["metric"] == m) & (table["pattern"] == "NS")].iloc[0]

    vanilla = row("vanilla", "time")
    direct = complexity_exponent(LENGTHS, [s for s in next(c for c in bench_curves(frame, "time")
                                                            if c.label == "vanilla").values(LENGTHS)], n_boot=200)
    assert vanilla["exponent"] == pytest.approx(direct.slope) and vanilla["low"] < 2.0 < vanilla["high"]
    assert (vanilla["theoretical"], vanilla["theory_source"]) == (2.0, "declared")
    assert vanilla["fails_from"] == 4096 and vanilla["fail_status"] == "oom"
    assert row("sdpa", "memory")["exponent"] == pytest.approx(1.0) and row("sdpa", "memory")["theoretical"] == 1.0
    local = row("local", "time")
    assert local["exponent"] == pytest.approx(1.0, abs=0.05) and local["theory_source"] == "family"
    assert row("local", "memory")["interval"] == "t"


def test_text_output(frame):
    text = format_efficiency(efficiency_table(frame, n_boot=50))
    assert "NS fwd float32 cpu B=1 H=8 D=64" in text and "vs vanilla" in text and "baseline oom from 4,096" in text
    always = [line for line in text.splitlines() if line.startswith("sdpa") and "time" in line and "vanilla" in line]
    assert "always cheaper" in always[0] and "<256" in always[0] and ">" not in always[0]  # below the range
    exponents = format_exponents(exponent_table(frame, n_boot=50))
    assert "2 (declared)" in exponents and "1 (family)" in exponents and "oom from 4,096" in exponents


def test_throughput_table_percent_of_peak(frame):
    table = throughput_table(frame)
    row = table[(table["attention"] == "sdpa") & (table["length"] == 2048)].iloc[0]
    seconds = float(frame[(frame["attention"] == "sdpa") & (frame["lq"] == 2048)].iloc[0]["metrics"]["median_ms"]) / 1e3
    assert row["tflops"] == pytest.approx(4 * 8 * 2048 ** 2 * 64 / seconds / 1e12)
    assert row["peak_device"] == "H100 SXM"
    assert row["pct_peak_flops"] == pytest.approx(100 * row["tflops"] / 66.9)  # float32 peak, no TF32
    moved = 4 * 8 * 2048 * 64 * 4  # q, k, v, o in float32
    assert row["pct_peak_bandwidth"] == pytest.approx(100 * moved / seconds / 3350e9)


def test_decode_table_and_text(frame):
    table = decode_table(frame)
    assert table["context"].tolist() == [64, 1024] and table["state_bytes"].tolist() == [65536, 1048576]
    text = format_decode(table)
    assert "CS decode float32 cpu B=1 H=8 (KV 2) D=64" in text and "1.0 MiB" in text and "0.200 [0.140-0.260]" in text


def test_unsupported_configurations_are_left_out(frame):
    assert "flash" not in set(exponent_table(frame, n_boot=0)["attention"])
    assert "flash" not in set(efficiency_table(frame, n_boot=0)["attention"])


def test_empty_store_gives_empty_tables(tmp_path):
    with ResultStore(tmp_path / "empty.sqlite") as store:
        frame = store.dataframe()
    assert efficiency_table(frame).empty and exponent_table(frame).empty and decode_table(frame).empty
    assert "no efficiency lengths" in format_efficiency(efficiency_table(frame))
