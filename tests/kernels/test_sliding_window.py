"""sliding_window: its torch backend (local's blocked path) and its flex backend (FlexAttention with the
window-and-sink mask) against the dense reference, outputs and gradients; the closed-form computed_pairs;
backend choice; conformance. The triton backend runs under the interpreter in test_kernels_interpret.py."""

import pytest
import torch

from cab import UnsupportedPattern, create_attention
from cab.attention.kernels.window import window_mask
from cab.check import run_conformance
from cab.status import Status
from tests.attn_helpers import assert_forward_matches_reference, holey_padding, random_qkv


@pytest.mark.parametrize("pattern,lq,lk,window,sinks", [
    ("NS", 37, 37, 3, 0), ("NS", 9, 9, 30, 20), ("NS", 7, 13, 2, 1), ("CS", 41, 41, 4, 3), ("CS", 15, 33, 3, 2),
    ("CS", 33, 15, 2, 1),
])
def test_torch_backend_matches_reference(pattern, lq, lk, window, sinks):
    attn = create_attention("sliding_window", pattern, 4, 8, window=window, sinks=sinks, backend="torch")
    q, k, v = random_qkv(2, 4, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))
    assert attn.backend == "torch"


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 29, 29), ("CS", 19, 29)])
def test_flex_backend_matches_reference(pattern, lq, lk):
    """float64 runs FlexAttention's unfused path with the block mask built from the same mask_mod (no
    compilation); the CPU gradient is the dense reference's."""
    attn = create_attention("sliding_window", pattern, 2, 8, window=3, sinks=2, backend="flex")
    q, k, v = random_qkv(2, 2, 2, lq, lk, 8)
    assert_forward_matches_reference(attn, q, k, v, holey_padding(lk))
    assert attn.backend == "flex"


@pytest.mark.parametrize("pattern,lq,lk,window,sinks", [
    ("NS", 37, 37, 3, 2), ("NS", 9, 9, 30, 20), ("NS", 13, 7, 0, 1), ("CS", 20, 45, 4, 6), ("CS", 45, 20, 2, 9),
    ("CS", 7, 7, 0, 0),
])
def test_computed_pairs_closed_form(pattern, lq, lk, window, sinks):
    attn = create_attention("sliding_window", pattern, 2, 4, window=window, sinks=sinks)
    q, k = torch.zeros(3, 2, lq, 4), torch.zeros(3, 2, lk, 4)
    expected = int(window_mask(lq, lk, window, sinks, pattern == "CS").sum()) * 3 * 2
    assert attn.computed_pairs(q, k, k) == expected


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 9, 9, 8, dtype=torch.float32))
    auto = create_attention("sliding_window", "CS", 2, 8)
    auto(q, k, v)
    assert auto.backend == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        create_attention("sliding_window", "CS", 2, 8, backend="triton")(q, k, v)
    with pytest.raises(ValueError, match="backend"):
        create_attention("sliding_window", "CS", 2, 8, backend="xformers")
    with pytest.raises(UnsupportedPattern, match="position"):
        create_attention("sliding_window", "NC", 2, 8)


@pytest.mark.parametrize("pattern", ["NS", "CS", "NC", "CC"])
def test_conformance(pattern):
    report = run_conformance("sliding_window", pattern)
    expected = Status.OK if pattern in ("NS", "CS") else Status.UNSUPPORTED
    assert report.status is expected, report.message
