"""Device peaks by reported name, bytes moved, % of peak arithmetic, NVML state off CUDA."""

import importlib.util

import pytest
import torch

from cab.analysis import device_peak, gpu_state, io_bytes, peak_fractions
from cab.analysis.hardware import throttle_reasons


@pytest.mark.parametrize("reported,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
])
def test_device_peak_by_name(reported, expected):
    assert device_peak(reported).name == expected


def test_unknown_device_has_no_peak():
    assert device_peak("Intel(R) Xeon(R) CPU") is None
    assert peak_fractions(1e12, 1e9, 1.0, "Intel(R) Xeon(R) CPU", "float32") == {}


def test_io_bytes_by_hand():
    # B=2, Hq=8, Hkv=2, Lq=100, Lk=300, D=64, bf16: q and o 2*8*100*64, k and v 2*2*300*64 elements each
    q = o = 2 * 8 * 100 * 64
    k = v = 2 * 2 * 300 * 64
    assert io_bytes(2, 8, 2, 100, 300, 64, 64, 2, "fwd") == 2 * (q + k + v + o)
    assert io_bytes(2, 8, 2, 100, 300, 64, 64, 2, "bwd") == 2 * 2 * (q + k + v + o)
    assert io_bytes(2, 8, 2, 100, 300, 64, 64, 2, "fwdbwd") == 2 * 3 * (q + k + v + o)


def test_peak_fractions():
    found = peak_fractions(flops=494.7e12, nbytes=1.675e12, seconds=1.0, device_name="NVIDIA H100 80GB HBM3",
                           dtype="bfloat16")
    assert found["pct_peak_flops"] == pytest.approx(50.0) and found["pct_peak_bandwidth"] == pytest.approx(50.0)
    assert "pct_peak_flops" not in peak_fractions(1e12, 1e9, 1.0, "Tesla T4", "bfloat16")  # T4 has no bf16


def test_throttle_reason_bits():
    assert throttle_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_reasons(0) == []


def test_gpu_state_is_empty_off_cuda():
    assert gpu_state("cpu") == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_state_reads_clocks_through_nvml():
    """With pynvml (not a dependency of cab) the clocks; without it, nothing rather than an error."""
    state = gpu_state("cuda")
    if importlib.util.find_spec("pynvml") is None:
        assert state == {}
        return
    assert state["sm_clock_mhz"] > 0 and state["max_sm_clock_mhz"] >= state["sm_clock_mhz"]
    assert isinstance(state["throttle_reasons"], list)
