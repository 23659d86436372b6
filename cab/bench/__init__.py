"""Efficiency measurement of attentions: timing (CPU perf_counter, CUDA events), peak memory in its own
pass, dense-equivalent FLOPs, the "bench" cell runner and the table `cab bench` prints."""

from cab.bench.cell_kind import bench_cell
from cab.bench.flops import dense_flops
from cab.bench.inputs import make_inputs
from cab.bench.memory import measure_memory
from cab.bench.table import bench_table
from cab.bench.timer import TimingStats, time_callable

__all__ = ["TimingStats", "bench_cell", "bench_table", "dense_flops", "make_inputs", "measure_memory", "time_callable"]
