"""Fidelity: numeric deviation per dtype beside eager attention's, approximation error against exact
softmax attention (relative RMSE) on random and structured inputs."""

import math

import pytest
import torch

from cab.analysis import approximation_error, numeric_deviation
from cab.analysis.fidelity import Shape, relative_rmse, structured_inputs
from cab.check.oracle import oracle_attention

SMALL = Shape(batch=1, heads=2, kv_heads=2, lq=24, lk=24, head_dim=16)


def test_exact_attention_deviation_is_on_eager_attentions_scale():
    found = numeric_deviation("sdpa", "CS", shape=SMALL)
    assert {(d.dtype, d.tensor) for d in found} == {
        (dtype, t) for dtype in ("float32", "bfloat16", "float16") for t in ("output", "dq", "dk", "dv")}
    eps = {"float32": 2 ** -23, "bfloat16": 2 ** -7, "float16": 2 ** -10}
    for d in found:
        assert d.reference == "float64 oracle" and d.message == ""
        assert 0 < d.error < 64 * eps[d.dtype] and 0 < d.eager_error < 64 * eps[d.dtype]
        assert 0.1 < d.ratio < 10, d


def test_approximate_attention_is_held_to_its_own_float64_run():
    found = numeric_deviation("performer", "NS", dtypes=("float32",), shape=SMALL)
    assert all(d.reference == "own float64 forward" for d in found)
    output = next(d for d in found if d.tensor == "output")
    assert output.error < 1e-5  # rounding only: the approximation itself is not counted here


def test_state_space_layer_reports_inputs_without_gradient():
    found = numeric_deviation("s4d", "CS", dtypes=("float32",), shape=SMALL)
    dq = next(d for d in found if d.tensor == "dq")
    assert dq.error is None and dq.ratio is None and "no gradient" in dq.message


def test_relative_rmse_by_hand():
    expected = torch.tensor([3.0, 4.0])
    assert relative_rmse(torch.tensor([3.0, 5.0]), expected) == pytest.approx(math.sqrt(0.5) / math.sqrt(12.5))


def test_exact_attentions_have_no_approximation_error():
    for name in ("vanilla", "sdpa"):
        for inputs in ("random", "structured"):
            found = approximation_error(name, "CS", inputs=inputs, shape=SMALL)
            assert found.relative_rmse < 1e-12 and found.dtype == "float64"


def test_local_attention_error_grows_as_the_window_shrinks():
    wide = approximation_error("local", "CS", hparams={"window": 64}, shape=SMALL)
    narrow = approximation_error("local", "CS", hparams={"window": 2}, shape=SMALL)
    assert wide.relative_rmse < 1e-12 < narrow.relative_rmse


def test_structured_inputs_have_a_few_dominant_visible_matches():
    shape = Shape(batch=2, heads=4, kv_heads=2, lq=40, lk=40, head_dim=32)
    q, k, v = structured_inputs(shape, "CS", matches=2, seed=1)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(32)
    future = torch.ones(40, 40, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    top2 = weights.topk(2, dim=-1).values.sum(dim=-1)
    assert float(top2.mean()) > 0.9  # two keys carry almost all the weight
    unmasked = torch.softmax(scores, dim=-1)
    assert float((unmasked * future).sum(dim=-1).mean()) < 0.05  # the matches lie in the visible past
    out = oracle_attention(q, k, v, "CS")
    assert out.shape == (2, 4, 40, 32) and torch.isfinite(out).all()


def test_unknown_input_kind_is_refused():
    with pytest.raises(ValueError, match="inputs must be one of random, structured"):
        approximation_error("vanilla", "NS", inputs="adversarial")
