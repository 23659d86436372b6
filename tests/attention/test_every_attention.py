"""What every registered attention owes, driven by the registry: a newly registered built-in is covered
without touching this file. For each attention and each pattern it declares: conformance (`cab.check`),
incremental decoding equal to forward() where it decodes, and forward() equal to its own reference() in
float64, outputs and gradients (inputs and parameters), with holes in the key padding. For each pattern it
does not declare: construction raises UnsupportedPattern naming the attention, the pattern and the declared
reason, and the conformance verdict is "unsupported". For the selection attentions (biformer, landmark, hip, sea,
routing): selecting every key is exact attention.

Mechanism-specific properties (hand-worked math, special cases) stay in the per-attention files."""

from __future__ import annotations

import pytest
import torch

from cab import registry
from cab.attention.base import UnsupportedPattern
from cab.check import run_conformance
from cab.patterns import Pattern
from cab.status import Status
from tests.attn_helpers import assert_forward_matches_reference, assert_is_exact_attention, holey_padding, random_qkv

PATTERNS = ("NS", "CS", "NC", "CC")
SPECS = [s for s in registry.all_specs() if s.cls.__module__.startswith("cab.")]  # the built-ins

# Hyper-parameters for the checks: small blocks, chunks and windows so that the checks' short sequences
# (L = 48 and the odd shapes) cross several of them, and to keep the suite's time in budget. Keyed by
# attention, or by (attention, pattern) where one pattern needs its own. Every other attention runs with
# its defaults.
HPARAMS: dict = {
    "aha": dict(window=4, bias=0.2),
    "biformer": {"region_size": 8, "topk": 2},
    "clear": {"radius": 2, "width": 8},
    "davit_channel": {"chunk_size": 16},
    "delta": {"gamma": 5, "base_hparams": {"window": 4, "sinks": 1}},
    "duo": dict(sinks=2, recent=5, retrieval_heads=(1,)),
    ("gna", "NS"): {"width": 8},
    ("halo", "NS"): {"width": 8, "block": 4, "halo": 1},
    "hedgehog": {"init_noise": 0.2},
    "hip": {"topk": 3, "block_size": 4},
    "hyper": {"block_size": 8, "sample_size": 6, "min_seq_len": 8, "lsh_num_projs": 3},  # approximate at L = 48
    "landmark": {"block_size": 5, "topk": 2},
    "lean": {"tile_size": 16},
    "linfusion": {"chunk_size": 16},
    "longshort": dict(window_size=8, num_landmarks=4, chunk_size=6, chunk_rank=2),
    "longvq": {"chunk_size": 16},
    "memory_efficient": {"query_chunk_size": 16, "key_chunk_size": 16},  # 48 and 63 rows: several chunks
    "moa": dict(alphas=(3, 4, 2, 8), betas=(0.0, 0.1, 0.2, 0.05), sinks=1),
    "power": {"block": 4},
    "qada": dict(window=6, sinks=2, threshold=0.7),
    "rectified_spa": {"block_size": 8, "topk": 2},
    "routing": {"num_clusters": 4},
    "s2_attn": {"group_size": 16},
    "scattered_linear": {"chunk_size": 8},
    "sea": {"block_size": 4, "topk": 3, "num_features": 16},
    "sf_attn": {"group_size": 16},
    "swat": {"window": 6},
    "window_global_random": {"block": 4, "window": 3, "global_blocks": 1, "random_blocks": 2},
}
# requested dtype of the conformance run where float32 is not the published one
DTYPE = {"flex": "float64"}
# the checks' O(L^3) per call (every triple of positions), called many times: marked, still run in CI
SLOW = {"triple_wise_attention"}


def hparams_of(name: str, pattern: str) -> dict:
    return dict(HPARAMS.get((name, pattern), HPARAMS.get(name, {})))


def _cases(declared: bool, keep=lambda spec, pattern: True) -> list:
    cases = []
    for spec in SPECS:
        for pattern in PATTERNS:
            if (Pattern(pattern) in spec.patterns) is declared and keep(spec, pattern):
                marks = [pytest.mark.slow] if spec.name in SLOW else []
                cases.append(pytest.param(spec, pattern, id=f"{spec.name}-{pattern}", marks=marks))
    return cases


def _available_here(spec) -> str:
    """The device to test on: CPU, or CUDA for attentions that run only there (skipped without one)."""
    if spec.unavailable_reason("cpu") is None:
        return "cpu"
    if torch.cuda.is_available() and spec.unavailable_reason("cuda") is None:
        return "cuda"
    report = run_conformance(spec.name, "NS" if Pattern.NS in spec.patterns else spec.patterns[0].value)
    assert report.status is Status.UNSUPPORTED and report.message == spec.unavailable_reason("cpu")
    pytest.skip(f"needs a CUDA device: {spec.name} on CPU: {spec.unavailable_reason('cpu')}")


PER_HEAD = {"alphas", "betas"}  # hyper-parameters with one entry per head (moa): cut to the head count


def _build(spec, pattern: str, heads: int = 4, dim: int = 8):
    hparams = {key: value[:heads] if key in PER_HEAD else value
               for key, value in hparams_of(spec.name, pattern).items()}
    return registry.create_attention(spec.name, pattern, heads, dim, **hparams).double()


def _kv_heads(spec, heads: int = 4) -> int:
    return heads // 2 if spec.supports_gqa else heads


# declared patterns ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,pattern", _cases(True))
def test_conformance(spec, pattern):
    device = _available_here(spec)
    report = run_conformance(spec.name, pattern, hparams=hparams_of(spec.name, pattern), device=device,
                             dtype=DTYPE.get(spec.name, "float32"))
    assert report.status is Status.OK, report.message
    ran = {c.name.split("[")[0] for c in report.checks}
    assert {"forward", "backward", "finite", "gradients", "key_padding", "odd_shapes"} <= ran, ran
    if pattern in ("CS", "CC") and spec.cls.has_decode():
        assert "decode" in ran
    if pattern in ("NS", "CS") and getattr(spec.cls, "supports_segments", False):
        assert "segments" in ran
    if spec.has_reference:
        assert "reference" in ran
    if spec.exact and spec.name not in DTYPE:
        _assert_full_exact_suite(spec, pattern, report)


def _assert_full_exact_suite(spec, pattern, report):
    """An exact attention runs every check, structural ones in float64 and again in the requested dtype,
    grouped-query heads among the odd shapes, and the long and wide suite shapes."""
    names = [c.name for c in report.checks]
    per_dtype = {"independence", "key_padding"}
    per_dtype |= {"CS": {"causal_prefix", "causal_grad"}, "CC": {"query_causal"}}.get(pattern, set())
    other = {"forward", "shape_dtype", "finite", "backward", "determinism", "gradients", "exact_oracle",
             "large_logits", "odd_shapes", "large_shapes"}
    if pattern in ("CS", "CC") and spec.cls.has_decode():
        per_dtype.add("decode")
    if pattern in ("NS", "CS") and spec.cls.supports_segments:
        per_dtype.add("segments")
    if spec.has_reference:
        per_dtype.add("reference")
    requested = report.coverage["dtypes"]["requested"]
    assert set(names) == other | per_dtype | {f"{n}[{requested}]" for n in per_dtype}
    assert report.message == f"all {len(names)} checks passed"
    assert "GQA 4/2" in next(c for c in report.checks if c.name == "odd_shapes").message
    assert report.coverage["dtypes"]["structural"] == "float64"
    assert any(s.startswith("long: ") and "Lq=1536" in s for s in report.coverage["shapes"])
    assert any(s.startswith("wide: ") and "Hq=8" in s and "D=128" in s for s in report.coverage["shapes"])


@pytest.mark.parametrize("spec,pattern", _cases(True, lambda spec, p: spec.has_reference))
def test_forward_matches_its_reference(spec, pattern):
    """float64, a padding mask with holes, Lq != Lk for the cross patterns; gradients with respect to q, k,
    v and every parameter."""
    if _available_here(spec) != "cpu":
        pytest.skip("needs a CUDA device: compared on CPU only")
    attn = _build(spec, pattern, heads=2)
    lq, lk = {"NS": (23, 23), "CS": (23, 23), "NC": (13, 21), "CC": (21, 13)}[pattern]
    q, k, v = random_qkv(2, 2, _kv_heads(spec, 2), lq, lk, 8)
    params = tuple(p for p in attn.parameters() if p.requires_grad)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk), wrt=(q, k, v, *params))


@pytest.mark.parametrize("spec,pattern", _cases(True, lambda spec, p: p in ("CS", "CC") and spec.cls.has_decode()))
def test_decode_matches_forward(spec, pattern):
    """Token by token from a prefilled state equals forward(), from an empty state and from nine prefilled
    tokens with padding among them; stepping twice from one state gives the same row."""
    attn = _build(spec, pattern, heads=2)
    cross = pattern == "CC"
    lq, lk = (17, 11) if cross else (20, 20)
    q, k, v = (t.detach() for t in random_qkv(2, 2, _kv_heads(spec, 2), lq, lk, 8))
    pad = torch.zeros(2, lk, dtype=torch.bool)
    pad[1, :2] = True
    for prefill in ((lk,) if cross else (0, 9)):
        mask = pad if prefill >= 2 else torch.zeros_like(pad)  # decode_step takes no padding
        full = attn(q, k, v, mask)
        state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], mask[:, :prefill])
        for t in range(0 if cross else prefill, lq):
            step = () if cross else (k[:, :, t:t + 1], v[:, :, t:t + 1])
            out, after = attn.decode_step(state, q[:, :, t:t + 1], *step)
            again, _ = attn.decode_step(state, q[:, :, t:t + 1], *step)
            torch.testing.assert_close(out[:, :, 0], full[:, :, t], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(again, out, rtol=0, atol=0)
            state = after
        assert attn.decode_state_bytes(state) > 0


# Selection attentions at hyper-parameters where the selection keeps every visible key, and the patterns
# checked: the output is exact attention on exact_attention_case, and (where the flag is set) computed_pairs
# counts every visible pair. Routing's pairs are the same-cluster pairs, checked in its own file.
EVERYTHING_SELECTED = {
    "biformer": ({"region_size": 4, "topk": 8}, PATTERNS, True),  # every region routed
    # l = 1: a landmark is its key and the inner softmax has one term, so retrieving every block makes the
    # grouped softmax plain softmax attention
    "landmark": ({"block_size": 1, "topk": 64}, PATTERNS, True),
    "hip": ({"topk": 4, "block_size": 8}, ("NS", "CS", "CC"), True),  # a budget covering every key
    "sea": ({"block_size": 4, "topk": 8, "num_features": 8}, ("NS", "CS", "CC"), True),  # every block kept
    "routing": ({"num_clusters": 1}, ("NS", "CS", "CC"), False),  # one cluster
}


@pytest.mark.parametrize("name,pattern", [(name, pattern) for name, (_, patterns, _) in EVERYTHING_SELECTED.items()
                                          for pattern in patterns])
def test_selecting_every_key_is_exact_attention(name, pattern):
    hparams, _, counts_pairs = EVERYTHING_SELECTED[name]
    attn = registry.create_attention(name, pattern, 2, 8, **hparams)
    assert_is_exact_attention(attn, pattern, counts_pairs=counts_pairs)


# undeclared patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,pattern", _cases(False))
def test_undeclared_pattern_is_refused(spec, pattern):
    with pytest.raises(UnsupportedPattern) as refused:
        registry.create_attention(spec.name, pattern, 2, 8, **hparams_of(spec.name, pattern))
    message = str(refused.value)
    assert repr(spec.name) in message and f"pattern {pattern} " in message
    reason = spec.unsupported_reasons.get(Pattern(pattern))
    assert reason, f"{spec.name} declares no reason for refusing {pattern}"
    assert reason in message
    report = run_conformance(spec.name, pattern, hparams=hparams_of(spec.name, pattern))
    missing = spec.unavailable_reason("cpu")  # a package or device missing here is said first (fla on CPU)
    assert report.status is Status.UNSUPPORTED, report.message
    assert reason in report.message or (missing and missing in report.message), report.message


def test_every_attention_module_is_covered():
    """Each module of cab/attention/ but the base registers attentions, and all of them are in the cases
    above (they come from the registry, not from a list here)."""
    from pathlib import Path

    import cab.attention

    folder = Path(cab.attention.__file__).parent
    modules = {f"cab.attention.{p.stem}" for p in folder.glob("*.py") if p.stem not in ("__init__", "base")}
    covered = {c.values[0].cls.__module__ for c in _cases(True)}
    assert modules <= covered, sorted(modules - covered)
