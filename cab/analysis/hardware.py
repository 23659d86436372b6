"""What a GPU can do and what state it was in: a table of known devices' peak dense FLOP/s per dtype and
memory bandwidth (vendor datasheets, no sparsity), the bytes an attention call must move, the fraction of
peak a measurement reached, and the clocks and throttle reasons NVML reports (when `pynvml` is
installed; an empty dict otherwise, so CPU-only machines need nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch

from cab.tables import typed_rows


@dataclass(frozen=True)
class DevicePeak:
    """Peak dense TFLOP/s per dtype (tensor cores for half types; float32 without TF32) and bandwidth."""

    name: str
    tflops: "dict[str, float]"
    bandwidth_gb_s: float


# (pattern matched against torch.cuda.get_device_name, peak); the first match wins, so variants come first
KNOWN_DEVICES: "list[tuple[str, DevicePeak]]" = [
    (r"H200", DevicePeak("H200 SXM", {"float16": 989.4, "bfloat16": 989.4, "float32": 66.9, "float64": 66.9}, 4800)),
    (r"H100.*PCIe",
     DevicePeak("H100 PCIe", {"float16": 756.5, "bfloat16": 756.5, "float32": 51.2, "float64": 51.2}, 2000)),
    (r"H100", DevicePeak("H100 SXM", {"float16": 989.4, "bfloat16": 989.4, "float32": 66.9, "float64": 66.9}, 3350)),
    (r"A100.*PCIe",
     DevicePeak("A100 PCIe 80GB", {"float16": 312, "bfloat16": 312, "float32": 19.5, "float64": 19.5}, 1935)),
    (r"A100.*40GB",
     DevicePeak("A100 SXM 40GB", {"float16": 312, "bfloat16": 312, "float32": 19.5, "float64": 19.5}, 1555)),
    (r"A100", DevicePeak("A100 SXM 80GB", {"float16": 312, "bfloat16": 312, "float32": 19.5, "float64": 19.5}, 2039)),
    (r"L40S", DevicePeak("L40S", {"float16": 362.05, "bfloat16": 362.05, "float32": 91.6}, 864)),
    (r"\bL4\b", DevicePeak("L4", {"float16": 121, "bfloat16": 121, "float32": 30.3}, 300)),
    (r"\bA10\b", DevicePeak("A10", {"float16": 125, "bfloat16": 125, "float32": 31.2}, 600)),
    (r"RTX 4090", DevicePeak("GeForce RTX 4090", {"float16": 165.2, "bfloat16": 165.2, "float32": 82.6}, 1008)),
    (r"V100", DevicePeak("V100 SXM2", {"float16": 125, "float32": 15.7, "float64": 7.8}, 900)),
    (r"\bT4\b", DevicePeak("T4", {"float16": 65, "float32": 8.1}, 320)),
]


def device_peak(device_name: str) -> "DevicePeak | None":
    """The peak of a device by its reported name ("NVIDIA H100 80GB HBM3"), or None when unknown."""
    for pattern, peak in KNOWN_DEVICES:
        if re.search(pattern, device_name or ""):
            return peak
    return None


def io_bytes(batch: int, heads: int, kv_heads: int, lq: int, lk: int, dk: int, dv: int, itemsize: int,
             mode: str) -> int:
    """The bytes an attention call must read and write at least: forward Q, K, V and O; backward adds
    dO, dQ, dK and dV (MEASUREMENT.md); fwdbwd both."""
    q, o = batch * heads * lq * dk, batch * heads * lq * dv
    k, v = batch * kv_heads * lk * dk, batch * kv_heads * lk * dv
    forward = q + k + v + o
    backward = forward + o + q + k + v  # + dO, dQ, dK, dV
    elements = {"fwd": forward, "fwd_infer": forward, "bwd": backward, "fwdbwd": forward + backward}[mode]
    return elements * itemsize


def peak_fractions(flops: float, nbytes: float, seconds: float, device_name: str, dtype: str) -> dict:
    """{"pct_peak_flops", "pct_peak_bandwidth", "peak_device"} of one measurement, empty when the device or
    dtype is not in the table."""
    peak = device_peak(device_name)
    if peak is None or seconds <= 0:
        return {}
    out = {"peak_device": peak.name, "pct_peak_bandwidth": 100.0 * nbytes / seconds / (peak.bandwidth_gb_s * 1e9)}
    if dtype in peak.tflops:
        out["pct_peak_flops"] = 100.0 * flops / seconds / (peak.tflops[dtype] * 1e12)
    return out


def throughput_table(df: pd.DataFrame) -> pd.DataFrame:
    """Effective TFLOP/s (dense-equivalent) and % of the device's peak FLOP/s and bandwidth of every ok
    bench row of a typed results table (cab.tables; percentages only for devices in KNOWN_DEVICES)."""
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    df = typed_rows(df)
    for _, row in df[(df["kind"] == "bench") & (df["status"] == "ok") & (df["mode"] != "decode")].iterrows():
        median_ms, flops, provenance = row["median_ms"], row["flops"], row.get("provenance") or {}
        if median_ms is None or flops is None:
            continue
        seconds = median_ms * 1e-3
        itemsize = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
        nbytes = io_bytes(row["batch"], row["heads"], row["kv_heads"], row["lq"], row["lk"], row["head_dim"],
                          row["head_dim"], itemsize, row["mode"])
        rows.append({
            "attention": row.get("label") or row["attention"], "pattern": row["pattern"], "mode": row["mode"],
            "dtype": row["dtype"], "length": row["lq"], "device_name": provenance.get("device_name", ""),
            "tflops": flops / seconds / 1e12,
            **peak_fractions(flops, nbytes, seconds, provenance.get("device_name", ""), row["dtype"]),
        })
    return pd.DataFrame(rows)


_THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def throttle_reasons(mask: int) -> "list[str]":
    """Names of the bits set in NVML's clocks-throttle-reasons mask."""
    return [name for bit, name in _THROTTLE_REASONS.items() if mask & bit]


def gpu_state(device: "str | torch.device") -> dict:
    """SM and memory clocks (MHz), max SM clock, temperature (C), power (W) and active throttle reasons of
    a CUDA device, read through NVML; {} off CUDA or without pynvml."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mask = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
        return {
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "throttle_reasons": throttle_reasons(int(mask)),
        }
    except pynvml.NVMLError as exc:
        return {"nvml_error": str(exc)}
