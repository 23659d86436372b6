"""Efficiency and fidelity analyses researchers can cite: efficiency lengths (CAB's fit, and a robust
crossing with a bootstrap interval) against eager and fused exact attention, empirical complexity
exponents beside the theoretical ones, FLOP counts and the check of declared FLOP formulas, numeric
deviation per dtype, approximation error, % of a GPU's peak.

The efficiency analyses take plain arrays, or a typed results table (`cab.tables`: the report's bench table;
the DataFrame of `cab.store.ResultStore.dataframe()` is typed once on the way in).
"""

from cab.analysis.curves import Curve, bench_curves
from cab.analysis.efficiency_length import EfficiencyLength, efficiency_length
from cab.analysis.exponent import Exponent, complexity_exponent
from cab.analysis.fidelity import ApproximationError, Deviation, approximation_error, numeric_deviation
from cab.analysis.flops import check_declared_flops, counted_flops, dense_flops, mask_flops
from cab.analysis.hardware import device_peak, gpu_state, io_bytes, peak_fractions, throughput_table
from cab.analysis.tables import decode_table, efficiency_table, exponent_table
from cab.analysis.text import format_decode, format_efficiency, format_exponents
from cab.analysis.theory import theoretical_exponent

__all__ = [
    "ApproximationError", "Curve", "Deviation", "EfficiencyLength", "Exponent", "approximation_error",
    "bench_curves", "check_declared_flops", "complexity_exponent", "counted_flops", "decode_table", "dense_flops",
    "device_peak", "efficiency_length", "efficiency_table", "exponent_table", "format_decode", "format_efficiency",
    "format_exponents", "gpu_state", "io_bytes", "mask_flops", "numeric_deviation", "peak_fractions",
    "theoretical_exponent", "throughput_table",
]
