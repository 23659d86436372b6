"""linear_elu: forward (torch backend) vs its explicit reference, every pattern, with padding and GQA; the
backend choice (auto is torch on CPU, an explicit triton refuses to run where it cannot); conformance.
The Triton backend itself is checked under the interpreter in tests/kernels/test_interpret.py."""

import pytest
import torch

from cab import create_attention
from cab.status import Status
from tests.attn_helpers import assert_reference_agrees, random_qkv


@pytest.mark.parametrize("pattern,lq,lk", [("NS", 37, 37), ("CS", 37, 37), ("CS", 21, 45), ("CS", 45, 21),
                                           ("NC", 19, 41), ("CC", 41, 19)])
def test_forward_matches_reference_with_gradients(pattern, lq, lk):
    attn = create_attention("linear_elu", pattern, 4, 8)
    assert_reference_agrees(attn, lq, lk)


def test_matches_the_recurrent_form():
    """Paper Eq. 9: out_i = phi(q_i) S_i / phi(q_i) z_i with S_i, z_i running sums (a Python loop)."""
    attn = create_attention("linear_elu", "CS", 2, 4)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 13, 13, 4))
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    s, z, rows = torch.zeros(1, 2, 4, 4, dtype=q.dtype), torch.zeros(1, 2, 4, dtype=q.dtype), []
    for i in range(13):
        s = s + phi(k[:, :, i, :, None]) * v[:, :, i, None, :]
        z = z + phi(k[:, :, i])
        rows.append((phi(q[:, :, i, None]) @ s).squeeze(-2) / (phi(q[:, :, i]) * z).sum(-1, keepdim=True))
    torch.testing.assert_close(attn(q, k, v), torch.stack(rows, dim=2), rtol=1e-10, atol=1e-12)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 9, 9, 8, dtype=torch.float32))
    auto = create_attention("linear_elu", "CS", 2, 8)
    auto(q, k, v)
    assert auto.backend == "torch"  # auto on CPU
    explicit = create_attention("linear_elu", "CS", 2, 8, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        explicit(q, k, v)
    with pytest.raises(ValueError, match="backend"):
        create_attention("linear_elu", "CS", 2, 8, backend="cuda")


def test_bench_row_records_the_backend():
    from cab.cells import Cell
    from cab.runner import run_cell

    options = {"gate": False, "memory": False, "min_run_time_s": 0.005, "warmup_s": 0.0, "min_samples": 3,
               "max_samples": 5}
    cell = Cell(kind="bench", attention="linear_elu", pattern="CS", mode="fwd", batch=1, heads=2, kv_heads=2,
                lq=16, lk=16, head_dim=8, options=options)
    result = run_cell(cell)
    assert result.status is Status.OK, result.message
    assert result.metrics["backend"] == "torch"
