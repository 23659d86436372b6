"""Incremental decoding: the KV-cache decoders of the exact attentions and the example plugin's recurrent
state reproduce independent references token by token; the state-size accounting; the `decode`
conformance check flags broken decoders; the decode benchmark cell."""


import pytest
import torch

from cab.attention.base import Attention
from cab.attention.engine.kv_cache import KVCache
from cab.attention.exact import VanillaAttention
from cab.bench.decode import decode_cell
from cab.cells import Cell
from cab.check.decode import check_decode
from cab.check.oracle import oracle_attention
from cab.check.subject import Subject
from cab.patterns import Pattern
from cab.registry import create_attention, get_spec, load_plugin, register_attention, unregister_attention
from cab.status import Status
from tests.paths import ROOT

EXAMPLE_PLUGIN = ROOT / "examples" / "plugin_package" / "src" / "cab_example_plugin" / "__init__.py"
DECODERS = [("vanilla", {}), ("sdpa", {}), ("memory_efficient", {"key_chunk_size": 5}), ("example_linear", {})]


@pytest.fixture(scope="module", autouse=True)
def example_plugin():
    assert load_plugin(str(EXAMPLE_PLUGIN)) == []


def _inputs(batch, heads, kv_heads, lq, lk, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return draw(batch, heads, lq, dim), draw(batch, kv_heads, lk, dim), draw(batch, kv_heads, lk, dim)


def _expected(name, attn, q, k, v, pattern, padding):
    """An independent reference: the float64 row oracle for exact attentions, reference() otherwise."""
    if get_spec(name).exact:
        return oracle_attention(q, k, v, pattern, key_padding_mask=padding)
    return attn.reference(q, k, v, key_padding_mask=padding)


@pytest.mark.parametrize("name,hparams", DECODERS, ids=[d[0] for d in DECODERS])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_self_decoding_matches_the_reference(name, hparams, kv_heads):
    attn = create_attention(name, "CS", 4, 8, **hparams).double()
    q, k, v = _inputs(2, 4, kv_heads, 11, 11)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, :2] = True  # two padded context tokens on the second row (decoded tokens are never padding)
    padded, plain = _expected(name, attn, q, k, v, "CS", padding), _expected(name, attn, q, k, v, "CS", None)
    for prefill, capacity in ((0, None), (5, 11), (5, 6)):  # grow from empty, exact capacity, grow once full
        mask = padding[:, :prefill] if prefill else None
        expected = padded if prefill else plain
        state = attn.decode_init(k[:, :, :prefill], v[:, :, :prefill], key_padding_mask=mask, capacity=capacity)
        for t in range(prefill, 11):
            step = (q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
            out, after = attn.decode_step(state, *step)
            again, after = attn.decode_step(state, *step)
            torch.testing.assert_close(out[:, :, 0], expected[:, :, t], rtol=0, atol=1e-12)
            torch.testing.assert_close(again, out, rtol=0, atol=0)
            state = after


@pytest.mark.parametrize("name,hparams", DECODERS, ids=[d[0] for d in DECODERS])
def test_causal_cross_decoding_matches_the_reference(name, hparams):
    attn = create_attention(name, "CC", 4, 8, **hparams).double()
    q, k, v = _inputs(3, 4, 2, 7, 13)
    padding = torch.zeros(3, 13, dtype=torch.bool)
    padding[1, 9:] = True
    padding[2, :] = True  # a memory of nothing but padding: the output row is zero
    expected = _expected(name, attn, q, k, v, "CC", padding)
    state = attn.decode_init(k, v, key_padding_mask=padding)
    decoded = torch.cat([attn.decode_step(state, q[:, :, t:t + 1])[0] for t in range(7)], dim=2)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-12)


def test_kv_cache_bytes_and_growth():
    attn = create_attention("sdpa", "CS", 4, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    state = attn.decode_init(k, v, capacity=6)
    assert isinstance(state, KVCache) and (state.length, state.capacity) == (5, 6)
    assert attn.decode_state_bytes(state) == 2 * (2 * 2 * 6 * 8 * 4)
    step = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    _, state = attn.decode_step(state, *step)
    _, grown = attn.decode_step(state, *step)
    assert (grown.length, grown.capacity) == (7, 16) and (state.length, state.capacity) == (6, 6)
    torch.testing.assert_close(grown.keys[:, :, :5], k)


def test_recurrent_state_does_not_grow_with_the_context():
    attn = create_attention("example_linear", "CS", 4, 8)
    sizes = {attn.decode_state_bytes(attn.decode_init(torch.randn(1, 4, n, 8), torch.randn(1, 4, n, 8)))
             for n in (1, 100, 1000)}
    assert sizes == {4 * (8 * 8 + 8) * 4}  # S (Hkv, D, Dv) and z (Hkv, D) in float32


def test_decoding_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="causal patterns CS and CC"):
        create_attention("vanilla", "NS", 4, 8).decode_init(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    assert VanillaAttention.has_decode() and not get_spec("performer").cls.has_decode()
    with pytest.raises(NotImplementedError, match="no incremental decoding"):
        Attention.decode_step(create_attention("performer", "CS", 4, 8), None, torch.randn(1, 4, 1, 8))


# the conformance check --------------------------------------------------------------------------------

def _subject(name, pattern):
    return Subject(get_spec(name), Pattern(pattern), {}, "cpu", torch.float32, 0)


@pytest.mark.parametrize("name", ["vanilla", "example_linear"])
@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_decode_check_passes_correct_decoders(name, pattern):
    outcome = check_decode(_subject(name, pattern))
    assert outcome.status is Status.OK and outcome.error < 1e-12, outcome.message
    assert "float64" in outcome.message


class _DropsNewToken(VanillaAttention):
    """Causal self decoding that forgets to let the new query see its own key."""

    def decode_step(self, state, q, k=None, v=None):
        keys, values, real = state.in_use()
        out = self.attend_cached(q, keys, values, real) if state.length else torch.zeros_like(q)
        return out, state.append(k, v)


class _MutatesState(VanillaAttention):
    """Decoding over a growing Python list: stepping twice from one state sees the first step's token."""

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        return {"k": [k], "v": [v]}

    def decode_step(self, state, q, k=None, v=None):
        state["k"].append(k)
        state["v"].append(v)
        keys, values = torch.cat(state["k"], dim=2), torch.cat(state["v"], dim=2)
        return self.attend_cached(q, keys, values, None), state


@pytest.fixture()
def broken_decoders():
    names = {"test_decode_drops_token": _DropsNewToken, "test_decode_mutates_state": _MutatesState}
    for name, cls in names.items():
        register_attention(name, patterns=("CS",), family="exact", exact=True)(type(name, (cls,), {}))
    yield list(names)
    for name in names:
        unregister_attention(name)


def test_decode_check_flags_broken_decoders(broken_decoders):
    dropped = check_decode(_subject("test_decode_drops_token", "CS"))
    assert dropped.status is Status.INCORRECT and "decoded" in dropped.message
    mutated = check_decode(_subject("test_decode_mutates_state", "CS"))
    assert mutated.status is Status.INCORRECT and "stepped twice" in mutated.message


# the benchmark cell -----------------------------------------------------------------------------------

def _decode(name, pattern, context, **options):
    return Cell(kind="bench", attention=name, pattern=pattern, batch=2, heads=4, kv_heads=2, lq=context,
                lk=context, head_dim=16, mode="decode",
                options={"gate": False, "min_run_time_s": 0.01, "warmup_s": 0.0, "min_samples": 3, **options})


@pytest.mark.parametrize("pattern", ["CS", "CC"])
def test_decode_cell_times_one_step_and_sizes_the_cache(pattern):
    outcome = decode_cell(_decode("sdpa", pattern, 300))
    metrics = outcome.metrics
    assert outcome.status is Status.OK and metrics["n"] >= 3 and metrics["context"] == 300
    assert metrics["state_bytes"] == 2 * (2 * 2 * 300 * 16 * 4)  # keys and values of 300 tokens, float32
    assert metrics["tokens_per_s"] == pytest.approx(2 / (metrics["median_ms"] * 1e-3))
    assert metrics["flops"] == 2 * 2 * 4 * 300 * 32 and len(metrics["trial_medians_ms"]) == 1


def test_decode_cell_trials_keep_every_sample():
    metrics = decode_cell(_decode("vanilla", "CS", 64, trials=3)).metrics
    assert len(metrics["trial_medians_ms"]) == 3 and metrics["n"] >= 9 and len(metrics["samples_ms"]) == metrics["n"]


def test_decode_cell_statuses():
    assert decode_cell(_decode("sdpa", "NS", 64)).status is Status.UNSUPPORTED
    no_step = decode_cell(_decode("performer", "CS", 64))
    assert no_step.status is Status.UNSUPPORTED and "no incremental decoding" in no_step.message
    with pytest.raises(ValueError, match="mode 'decode'"):
        decode_cell(Cell(kind="bench", attention="sdpa", pattern="CS", mode="fwd"))


def test_kv_cache_bytes_shrink_with_grouped_and_multi_query_heads():
    """M5: the decode state of an exact attention holds Hkv heads, so GQA/MQA divide the cache."""
    from cab.bench import bench_cell
    from cab.cells import Cell

    fast = {"gate": False, "min_run_time_s": 0.005, "warmup_s": 0.0, "min_samples": 3, "max_samples": 10}
    sizes = {}
    for kv in (8, 2, 1):
        cell = Cell(kind="bench", attention="sdpa", pattern="CS", mode="decode", batch=1, heads=8, kv_heads=kv,
                    lq=64, lk=64, head_dim=16, options=fast)
        sizes[kv] = bench_cell(cell).metrics["state_bytes"]
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]
