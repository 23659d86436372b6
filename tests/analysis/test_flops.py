"""FLOPs: every declared algorithmic formula against torch's FlopCounterMode on the forward pass; dense
counts of arbitrary masks against the pattern counts and a hand count; cost budgets that skip cells."""


import pytest
import torch

from cab.analysis import check_declared_flops, dense_flops, mask_flops
from cab.budget import over_budget
from cab.cells import Cell
from cab.patterns import attention_mask
from cab.registry import all_specs, create_attention, get_spec, load_plugin
from cab.status import Status
from tests.paths import ROOT

EXAMPLE_PLUGIN = ROOT / "examples" / "plugin_package" / "src" / "cab_example_plugin" / "__init__.py"
# small chunks so that memory_efficient's chunk loop (and its causal skipping) is exercised
HPARAMS = {"memory_efficient": {"query_chunk_size": 8, "key_chunk_size": 16}}


def _declaring():
    assert load_plugin(str(EXAMPLE_PLUGIN)) == []
    found = []
    for spec in all_specs():
        for pattern in spec.patterns:
            if spec.unavailable_reason("cpu"):
                continue
            attn = create_attention(spec.name, pattern, 4, 16, **HPARAMS.get(spec.name, {}))
            if attn.algorithmic_flops(1, 8, 8, 4) is not None:
                found.append((spec.name, pattern.value))
    return found


DECLARING = _declaring()


def test_the_exact_attentions_and_the_example_declare_formulas():
    names = {name for name, _ in DECLARING}
    assert {"vanilla", "sdpa", "memory_efficient", "example_linear"} <= names


@pytest.mark.parametrize("name,pattern", DECLARING, ids=[f"{n}-{p}" for n, p in DECLARING])
def test_declared_formula_matches_the_flop_counter(name, pattern):
    attn = create_attention(name, pattern, 4, 16, **HPARAMS.get(name, {}))
    cross = pattern in ("NC", "CC")
    spec = get_spec(name)
    for batch, lq, lk, kv_heads, padded in [
        (2, 37, 23 if cross else 37, 4, False),
        (1, 50, 61 if cross else 50, 2, True),
    ]:
        if kv_heads != 4 and not spec.supports_gqa:
            continue
        check = check_declared_flops(attn, batch, lq, lk, kv_heads, padded=padded)
        assert check.counted > 0 and check.agrees, f"{name} {pattern} {check.shape}: declared {check.declared}, " \
                                                   f"counted {check.counted}"


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
def test_mask_flops_equal_the_pattern_counts(pattern, mode):
    lq, lk = 13, (9 if pattern in ("NC", "CC") else 13)
    padding = torch.zeros(2, lk, dtype=torch.bool)
    padding[1, -3:] = True
    mask = attention_mask(pattern, lq, lk, padding).expand(2, 1, lq, lk)
    assert mask_flops(mask, 4, 16, 8, mode) == dense_flops(pattern, 2, 4, lq, lk, 16, 8, mode, key_padding_mask=padding)


def test_mask_flops_of_a_sliding_window_by_hand():
    length, window = 10, 2
    rows = torch.arange(length)
    mask = ((rows[:, None] - rows[None, :]).abs() <= window)[None, None]
    pairs = sum(min(length - 1, i + window) - max(0, i - window) + 1 for i in range(length))  # 44
    assert mask_flops(mask, heads=3, dk=8, dv=8) == 2 * 3 * pairs * 16
    with pytest.raises(ValueError, match="bool tensor of 4 dimensions"):
        mask_flops(mask.float(), 3, 8, 8)


def _bench(name, length, **options):
    return Cell(kind="bench", attention=name, pattern="NS", batch=1, heads=8, kv_heads=8, lq=length, lk=length,
                head_dim=64, mode="fwd", options=options)


def test_budget_skips_eager_attention_by_its_memory_estimate():
    cell = _bench("vanilla", 65536, max_memory_bytes=16 * 2 ** 30)
    outcome = over_budget(create_attention("vanilla", "NS", 8, 64), cell)
    assert outcome.status is Status.SKIPPED and "memory estimate" in outcome.message
    scores = 8 * 65536 ** 2 * 4
    assert 2 * scores < outcome.metrics["mem_estimate_bytes"] < 3 * scores
    assert over_budget(
        create_attention("vanilla", "NS", 8, 64), _bench("vanilla", 1024, max_memory_bytes=2 ** 34)
    ) is None


def test_budget_skips_by_declared_flops_and_never_an_undeclared_attention():
    sdpa = create_attention("sdpa", "NS", 8, 64)
    skipped = over_budget(sdpa, _bench("sdpa", 32768, max_flops=1e12))
    assert skipped.status is Status.SKIPPED and skipped.metrics["flops_estimate"] == 4 * 8 * 32768 ** 2 * 64
    assert over_budget(sdpa, _bench("sdpa", 4096, max_flops=1e12)) is None
    performer = create_attention("performer", "NS", 8, 64)
    assert over_budget(performer, _bench("performer", 65536, max_flops=1.0, max_memory_bytes=1)) is None


def test_vanilla_memory_estimate_bounds_the_measured_peak():
    """The estimate is an upper bound of what cab's memory probe measured (2.1 and 3.1 score matrices)."""
    attn = create_attention("vanilla", "CS", 8, 64)
    scores = 8 * 2048 ** 2 * 4
    for mode, measured in (("fwd", 2.10), ("fwd_infer", 2.07), ("fwdbwd", 3.10)):
        estimate = attn.peak_memory_estimate(1, 2048, 2048, 8, mode, torch.float32)
        assert measured * scores < estimate < 1.2 * measured * scores
