"""Expansion of configs into cells: counts, fields, options and a deterministic order with stable keys."""

import json
import os
import subprocess
import sys
import textwrap

from cab import registry
from cab.config import load_config
from cab.grid import expand
from tests.paths import ROOT

GRID = """\
name: grid
attentions:
  - vanilla
  - {name: memory_efficient, hparams: {query_chunk_size: 16}}
  - {name: sdpa, label: fused}
patterns: [NS, CS, NC, CC]
threads: 2
seed: 3
check:
  dtype: float64
bench:
  lengths: [32, 50]
  kv_ratio: 0.5
  batch: 2
  heads: 4
  kv_heads: 2
  head_dim: 8
  modes: [fwd, fwdbwd]
  dtypes: [float32, bfloat16]
  min_run_time_s: 0.2
  memory: false
"""

# the same grid, mapping keys in another order (lists keep theirs: their order is data)
GRID_REORDERED = """\
bench:
  memory: false
  min_run_time_s: 0.2
  dtypes: [float32, bfloat16]
  modes: [fwd, fwdbwd]
  head_dim: 8
  kv_heads: 2
  heads: 4
  batch: 2
  kv_ratio: 0.5
  lengths: [32, 50]
check:
  dtype: float64
seed: 3
threads: 2
patterns: [NS, CS, NC, CC]
attentions:
  - vanilla
  - {hparams: {query_chunk_size: 16}, name: memory_efficient}
  - {label: fused, name: sdpa}
name: grid
"""

def _grid(tmp_path, text=GRID, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_counts_and_fields(tmp_path):
    cells = expand(_grid(tmp_path))
    checks = [c for c in cells if c.kind == "check"]
    benches = [c for c in cells if c.kind == "bench"]
    assert len(checks) == 3 * 4 and len(benches) == 3 * 4 * 2 * 2 * 2
    assert cells == checks + benches  # check section first
    assert {(c.attention, c.pattern) for c in checks} == {
        (a, p) for a in ("vanilla", "memory_efficient", "sdpa") for p in ("NS", "CS", "NC", "CC")}
    # conformance runs on one thread (a pool runs one per core); seed 3 is not the gate's run: nothing to probe
    assert all(c.dtype == "float64" and c.seed == 3 and c.mode == "" and c.options == {"threads": 1} for c in checks)
    for c in benches:
        assert (c.batch, c.heads, c.kv_heads, c.head_dim, c.seed, c.device) == (2, 4, 2, 8, 3, "cpu")
        assert c.options == {"threads": 2, "min_run_time_s": 0.2, "memory": False}
        assert c.lk == (round(c.lq * 0.5) if c.pattern in ("NC", "CC") else c.lq)
    assert {(c.lq, c.lk) for c in benches if c.pattern == "NC"} == {(32, 16), (50, 25)}
    assert {c.mode for c in benches} == {"fwd", "fwdbwd"} and {c.dtype for c in benches} == {"float32", "bfloat16"}
    me = [c for c in cells if c.attention == "memory_efficient"]
    assert all(c.hparams == {"query_chunk_size": 16} and c.label == "memory_efficient(query_chunk_size=16)"
               for c in me)
    assert {c.label for c in cells if c.attention == "sdpa"} == {"fused"}
    assert len({c.key for c in cells}) == len(cells)


def test_order_is_attention_pattern_length_mode_dtype(tmp_path):
    benches = [c for c in expand(_grid(tmp_path)) if c.kind == "bench"]
    order = [(c.attention, c.pattern, c.lq, c.mode, c.dtype) for c in benches]
    rank = {"vanilla": 0, "memory_efficient": 1, "sdpa": 2, "NS": 0, "CS": 1, "NC": 2, "CC": 3,
            "fwd": 0, "fwdbwd": 1, "float32": 0, "bfloat16": 1}
    assert order == sorted(order, key=lambda t: (rank[t[0]], rank[t[1]], t[2], rank[t[3]], rank[t[4]]))


def test_same_config_same_keys_twice_and_reordered(tmp_path):
    first = [c.key for c in expand(_grid(tmp_path))]
    again = [c.key for c in expand(load_config(_grid(tmp_path)))]
    reordered = [c.key for c in expand(_grid(tmp_path, GRID_REORDERED, "reordered.yaml"))]
    assert first == again == reordered


def test_same_keys_in_a_fresh_process_with_another_hash_seed(tmp_path):
    path = _grid(tmp_path)
    code = "import json, sys; from cab.grid import expand; print(json.dumps([c.key for c in expand(sys.argv[1])]))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT)
    assert json.loads(out.stdout) == [c.key for c in expand(path)]


def test_all_minus_exclude_and_section_overrides(tmp_path):
    path = _grid(tmp_path, textwrap.dedent("""\
        name: all
        attentions: all
        exclude: [vanilla]
        check:
          patterns: [CC]
        bench:
          attentions: [vanilla]
          patterns: [cs, ns]
          lengths: [16]
          modes: [fwd_infer]
        """))
    cells = expand(path)
    expected = [n for n in registry.names() if n != "vanilla"]
    assert [(c.attention, c.pattern) for c in cells if c.kind == "check"] == [(n, "CC") for n in expected]
    assert [(c.attention, c.pattern, c.mode) for c in cells if c.kind == "bench"] == [
        ("vanilla", "CS", "fwd_infer"), ("vanilla", "NS", "fwd_infer")]


def test_check_cells_cover_undeclared_patterns(tmp_path):
    plugin = tmp_path / "ns_only_plugin.py"
    plugin.write_text(textwrap.dedent("""\
        import cab

        @cab.register_attention("grid_ns_only", patterns=("NS",), family="test", exact=False)
        class NSOnly(cab.Attention):
            def __init__(self, pattern, num_heads, head_dim):
                super().__init__(pattern, num_heads, head_dim)

            def forward(self, q, k, v, key_padding_mask=None):
                return v
        """))
    path = _grid(tmp_path, "name: p\nplugins: [ns_only_plugin.py]\nattentions: [grid_ns_only]\ncheck: {}\n")
    assert [c.pattern for c in expand(path)] == ["NS", "CS", "NC", "CC"]


def test_threads_default_to_every_core(tmp_path):
    path = _grid(tmp_path, "name: p\nattentions: [sdpa]\npatterns: [NS]\ncheck: {}\nbench: {lengths: [64]}\n")
    check, *benches = expand(path)
    assert check.options["threads"] == 1 and benches
    assert all(bench.options["threads"] == os.cpu_count() for bench in benches)


def test_kv_heads_list_sweeps_grouped_and_multi_query(tmp_path):
    """kv_heads: [8, 2, 1] makes each value a grid point; every cell key differs; attentions without GQA
    support get only kv_heads == heads."""
    from cab.grid import expand
    from cab.registry import all_specs

    no_gqa = next((s.name for s in all_specs() if not s.supports_gqa), None)
    names = ["sdpa"] + ([no_gqa] if no_gqa else [])
    path = tmp_path / "gqa.yaml"
    path.write_text(f"name: gqa\nattentions: {names}\npatterns: [CS]\nbench:\n  lengths: [64]\n"
                    "  heads: 8\n  kv_heads: [8, 2, 1]\n  modes: [decode]\n")
    cells = expand(path)
    sdpa = sorted(c.kv_heads for c in cells if c.attention == "sdpa")
    assert sdpa == [1, 2, 8] and len({c.key for c in cells}) == len(cells)
    if no_gqa:
        assert [c.kv_heads for c in cells if c.attention == no_gqa] == [8]


def test_shipped_gqa_config_expands():
    from cab.grid import expand

    cells = expand("configs/gqa-decode.yaml")
    assert {c.kv_heads for c in cells if c.kind == "bench"} == {8, 2, 1}


def test_the_gates_check_cells_carry_the_shapes_the_benchmarks_publish(tmp_path):
    text = (GRID.replace("seed: 3", "seed: 0").replace("dtype: float64", "dtype: float32")
            .replace("modes: [fwd, fwdbwd]", "modes: [fwd, fwdbwd, decode]")
            .replace("  memory: false", "  memory: false\n  max_flops: 1.0e+9"))
    cells = expand(_grid(tmp_path, text))
    checks = {(c.attention, c.pattern): c for c in cells if c.kind == "check"}
    # one entry per distinct size (fwd and fwdbwd share it; decode cells and bfloat16 cells are not probed here)
    assert checks["vanilla", "NC"].options["published"] == [
        {"batch": 2, "heads": 4, "kv_heads": 2, "lq": lq, "lk": lk, "head_dim": 8, "mode": "fwd", "max_flops": 1e9}
        for lq, lk in ((32, 16), (50, 25))]
    assert [(s["lq"], s["lk"]) for s in checks["sdpa", "CS"].options["published"]] == [(32, 32), (50, 50)]
    # the keys do not change: options never enter them
    assert [c.key for c in cells if c.kind == "check"] == [
        c.key for c in expand(_grid(tmp_path, text.replace("lengths: [32, 50]", "lengths: [40]"), "other.yaml"))
        if c.kind == "check"]
