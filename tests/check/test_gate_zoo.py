"""The correctness gate against a zoo of subtly broken attentions (tests/plugins/zoo.py): every flaw, one per
kind the gate must catch, is caught in every pattern it applies to, by the check meant for it, and no speed
is reported for it; a flaw that only a published shape shows is caught by the probe of that shape."""

import pytest

import cab
from cab import registry
from cab.bench import bench_cell
from cab.cells import Cell
from cab.check import gate, published_shape, run_conformance
from cab.status import Status
from tests.paths import PLUGINS

ZOO = PLUGINS / "zoo.py"
CLASSES = {
    "published shapes", "dtype and backend", "gradient values", "batches without a mask", "padding not on the right",
    "rows that see no key", "memory contract", "large logits", "references sharing code", "misattributed failures",
}


def _zoo_module():
    errors = registry.load_plugin(str(ZOO))
    assert errors == [], errors
    import sys

    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(ZOO.resolve()))


FLAWS = _zoo_module().FLAWS
CASES = [(name, pattern, dtype, expected, kind) for name, (kind, patterns, dtype, expected) in FLAWS.items()
         for pattern in patterns]


def test_the_zoo_has_a_flaw_of_every_kind():
    assert {kind for kind, *_ in FLAWS.values()} == CLASSES


@pytest.mark.parametrize("name,pattern,dtype,expected,kind", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_flaw_is_caught_by_the_check_meant_for_it(name, pattern, dtype, expected, kind):
    report = run_conformance(name, pattern, dtype=dtype)
    assert report.status is Status.INCORRECT, report.message
    failing = {c.name for c in report.failing}
    assert failing & expected, (failing, report.message)
    if kind == "misattributed failures":  # named for what it does, before any check it then trips
        assert report.deciding_check.name in expected, report.message
    if name == "zoo_dropout_in_eval":
        assert "random from call to call" in report.deciding_check.message


def test_a_flaw_past_the_suites_lengths_is_caught_by_the_probe_of_the_published_shape():
    suite = gate("zoo_long_path_leak", "CS", None, "cpu", "float32")
    assert suite.status is Status.OK, suite.message  # the fixed suite stops at 1536 tokens
    shape = published_shape(1, 2, 2, 2048, 2048, 16)
    probed = gate("zoo_long_path_leak", "CS", None, "cpu", "float32", shape)
    assert probed.status is Status.INCORRECT
    assert probed.deciding_check.name == "published"
    assert "causality: " in probed.deciding_check.message and "gradient: " in probed.deciding_check.message
    assert any("published: B=1 Hq=2 Hkv=2 Lq=2048 Lk=2048 D=16" in s for s in probed.coverage["shapes"])
    # and the bench reports no timing for it
    cell = Cell(kind="bench", attention="zoo_long_path_leak", pattern="CS", batch=1, heads=2, kv_heads=2, lq=2048,
                lk=2048, head_dim=16, mode="fwd", options={"min_run_time_s": 0.01, "memory": False})
    outcome = bench_cell(cell)
    assert outcome.status is Status.INCORRECT and "median_ms" not in outcome.metrics
    assert outcome.message.startswith("correctness gate failed: published:")


def test_a_check_cell_probes_the_published_shapes_and_the_benchmark_reuses_its_probe(monkeypatch):
    import importlib

    from cab.check import cell_kind, conformance

    gate_module = importlib.import_module("cab.check.gate")
    monkeypatch.setattr(gate_module, "_REPORTS", {})
    published = [{"batch": 1, "heads": 2, "kv_heads": 2, "lq": n, "lk": n, "head_dim": 16, "mode": "fwd"}
                 for n in (2048, 96)]
    check = Cell(kind="check", attention="zoo_long_path_leak", pattern="CS", options={"published": published})
    outcome = cell_kind.check_cell(check)
    assert outcome.status is Status.INCORRECT  # the suite passes; the 2048-token probe does not
    names = [c["name"] for c in outcome.metrics["checks"]]
    assert {"published B=1 Hq=2 Hkv=2 Lq=2048 Lk=2048 D=16", "published B=1 Hq=2 Hkv=2 Lq=96 Lk=96 D=16"} <= set(names)
    failing = [c for c in outcome.metrics["checks"] if c["status"] != "ok"]
    assert [c["name"] for c in failing] == ["published B=1 Hq=2 Hkv=2 Lq=2048 Lk=2048 D=16"]
    probes = []
    monkeypatch.setattr(gate_module, "run_probe", lambda *a, **k: probes.append(a) or conformance.run_probe(*a, **k))
    bench = Cell(kind="bench", attention="zoo_long_path_leak", pattern="CS", batch=1, heads=2, kv_heads=2, lq=2048,
                 lk=2048, head_dim=16, mode="fwd", options={"min_run_time_s": 0.01, "memory": False})
    assert bench_cell(bench).status is Status.INCORRECT and probes == []  # the check cell's probe, not another


def test_a_check_cell_does_not_probe_a_size_the_benchmarks_budget_skips():
    from cab.check import cell_kind

    small = {"batch": 1, "heads": 2, "kv_heads": 2, "lq": 64, "lk": 64, "head_dim": 16, "mode": "fwd",
             "max_flops": 1e9}
    check = Cell(kind="check", attention="vanilla", pattern="NS",
                 options={"published": [small, {**small, "lq": 8192, "lk": 8192}]})
    names = [c["name"] for c in cell_kind.check_cell(check).metrics["checks"]]
    assert [n for n in names if n.startswith("published")] == ["published B=1 Hq=2 Hkv=2 Lq=64 Lk=64 D=16"]


def test_a_timing_records_what_its_gate_covered():
    cell = Cell(kind="bench", attention="vanilla", pattern="CS", batch=1, heads=2, kv_heads=2, lq=96, lk=96,
                head_dim=16, mode="fwd", options={"min_run_time_s": 0.01, "memory": False})
    outcome = bench_cell(cell)
    assert outcome.status is Status.OK
    coverage = outcome.metrics["gate_coverage"]
    assert coverage["dtypes"] == {"structural": "float64", "requested": "float32"}
    assert "published: B=1 Hq=2 Hkv=2 Lq=96 Lk=96 D=16 float32" in coverage["shapes"]
    assert coverage["backends"]["float32"] == "torch"


def test_the_gate_skips_a_published_probe_when_the_suite_fails():
    shape = published_shape(1, 2, 2, 64, 64, 16)
    report = gate("zoo_nan_empty_rows", "NS", None, "cpu", "float32", shape)
    assert report.status is Status.INCORRECT and "published" not in {c.name for c in report.checks}


@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_the_decode_probe_checks_one_step_at_the_published_context(pattern):
    shape = published_shape(1, 2, 2, 1, 700, 16)
    report = gate("vanilla", pattern, None, "cpu", "float32", shape, decode=True)
    assert report.status is Status.OK, report.message
    probe = report.checks[-1]
    assert probe.name == "published" and "one decoding step at context 700" in probe.message


def test_large_logits_honours_a_declared_bound():
    report = run_conformance("zoo_no_max_subtraction", "NC")
    assert report.deciding_check.name == "large_logits" and "max |logit| 200" in report.deciding_check.message
    cls = cab.get_spec("zoo_no_max_subtraction").cls
    cls.max_logit = 50.0  # within float32's exp range: declared, then honoured
    try:
        bounded = run_conformance("zoo_no_max_subtraction", "NC")
    finally:
        del cls.max_logit
    outcome = next(c for c in bounded.checks if c.name == "large_logits")
    assert outcome.status is Status.OK and "declares max_logit = 50" in outcome.message


def test_zoo_flaws_hidden_from_float64_show_in_the_requested_dtype():
    report = run_conformance("zoo_fast_path_noncausal", "CS")
    by_name = {c.name: c for c in report.checks}
    assert by_name["causal_prefix"].status is Status.OK  # float64 runs the correct path
    assert by_name["causal_prefix[float32]"].status is Status.INCORRECT
