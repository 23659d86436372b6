"""configs/kernels-gpu.yaml parses and expands to the rows the kernels issue asks for."""

from cab.config import load_config
from cab.grid import expand
from tests.paths import ROOT

CONFIG = ROOT / "configs" / "kernels-gpu.yaml"


def test_kernels_gpu_config_expands():
    config = load_config(CONFIG)
    cells = [c for c in expand(config) if c.kind == "bench"]
    assert {c.dtype for c in cells} == {"bfloat16"} and {c.device for c in cells} == {"cuda"}
    assert {(c.batch, c.heads, c.head_dim) for c in cells} == {(4, 16, 128)}
    assert {c.lq for c in cells} == {2048 * 2**i for i in range(7)}
    assert {c.mode for c in cells} == {"fwd", "fwdbwd"}
    rows = {(c.attention, c.hparams.get("backend")) for c in cells}
    assert {("linear_elu", "triton"), ("linear_elu", "torch"), ("fla_chunk_linear", None),
            ("fla_fused_recurrent", None), ("sdpa", None), ("flash", None), ("flex", None),
            ("sliding_window", "triton"), ("sliding_window", "flex")} <= rows
    windows = {c.hparams["window"] for c in cells if c.attention == "sliding_window"}
    assert windows == {512}
