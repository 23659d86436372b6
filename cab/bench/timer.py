"""Timing of one callable: warm-up, a sample count chosen from a time budget (triton `do_bench`
semantics), every sample kept. CPU samples use `time.perf_counter`; CUDA samples use one event pair each,
after an L2 flush outside the events."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from cab.metrics import Timing

HIGH_CV = 0.05  # a cell whose coefficient of variation is above this is flagged
_FALLBACK_L2_BYTES = 128 * 1024 * 1024  # when the device does not report its L2 size (flush 2x this)

clock: Callable[[], float] = time.perf_counter  # module attribute so tests can substitute a fake clock


@dataclass(frozen=True)
class TimingStats:
    """Every sample of one timed callable (milliseconds), the timer that took them and the thread count."""

    samples_ms: tuple[float, ...]
    timer: str
    threads: int
    warmup_calls: int = 0

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("TimingStats needs at least one sample")

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def _percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples_ms, dtype=np.float64), q))

    @property
    def median_ms(self) -> float:
        return self._percentile(50)

    @property
    def p20_ms(self) -> float:
        return self._percentile(20)

    @property
    def p80_ms(self) -> float:
        return self._percentile(80)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def std_ms(self) -> float:
        """Sample standard deviation (n - 1 in the denominator; 0 for a single sample)."""
        return float(np.std(self.samples_ms, ddof=1)) if self.n > 1 else 0.0

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def max_ms(self) -> float:
        return float(max(self.samples_ms))

    @property
    def cv(self) -> float:
        """Coefficient of variation, std / mean."""
        mean = self.mean_ms
        return self.std_ms / mean if mean > 0 else 0.0

    @property
    def high_cv(self) -> bool:
        return self.cv > HIGH_CV

    def timing(self) -> Timing:
        """The timing part of a bench or decode result's metrics (all samples and their summary)."""
        return Timing(
            samples_ms=list(self.samples_ms), median_ms=self.median_ms, p20_ms=self.p20_ms, p80_ms=self.p80_ms,
            mean_ms=self.mean_ms, std_ms=self.std_ms, min_ms=self.min_ms, max_ms=self.max_ms, n=self.n,
            cv=self.cv, high_cv=self.high_cv, timer=self.timer, threads=self.threads,
            warmup_calls=self.warmup_calls,
        )


class CpuTimer:
    """Wall time of each call with `time.perf_counter` (CPU work is synchronous)."""

    name = "perf_counter"

    def once(self, fn: Callable[[], object]) -> float:
        """Seconds of one call (used for warm-up and the per-call estimate)."""
        start = clock()
        fn()
        return clock() - start

    def samples(self, fn: Callable[[], object], n: int, before_sample: Optional[Callable[[], None]]) -> list[float]:
        """Milliseconds of n calls; before_sample runs before each, outside the timed region."""
        out = []
        for _ in range(n):
            if before_sample is not None:
                before_sample()
            start = clock()
            fn()
            out.append((clock() - start) * 1e3)
        return out


class CudaTimer:
    """One CUDA event pair per sample on the current stream; zeroes a buffer of twice the L2 size before
    each sample (outside the events) so no sample reads inputs left in cache by the previous one."""

    name = "cuda_event"

    def __init__(self, device: "torch.device | str"):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        l2_bytes = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or _FALLBACK_L2_BYTES
        self.flush_buffer = torch.empty(2 * l2_bytes, dtype=torch.int8, device=self.device)

    def once(self, fn: Callable[[], object]) -> float:
        torch.cuda.synchronize(self.device)
        start = clock()
        fn()
        torch.cuda.synchronize(self.device)
        return clock() - start

    def samples(self, fn: Callable[[], object], n: int, before_sample: Optional[Callable[[], None]]) -> list[float]:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            torch.cuda.synchronize(self.device)
            for start, end in zip(starts, ends):
                if before_sample is not None:
                    before_sample()
                self.flush_buffer.zero_()
                start.record(stream)
                fn()
                end.record(stream)
            torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


Timer = Union[CpuTimer, CudaTimer]


def timer_for(device: "torch.device | str") -> Timer:
    """The timer for a device string ("cpu", "cuda", "cuda:1")."""
    kind = torch.device(device).type
    if kind == "cpu":
        return CpuTimer()
    if kind == "cuda":
        return CudaTimer(device)
    raise ValueError(f"no timer for device {device!r} (cab times on cpu and cuda)")


def sample_count(estimate_s: float, min_run_time_s: float, min_samples: int, max_samples: int) -> int:
    """Enough samples to fill min_run_time_s at the estimated per-call time, within [min, max]."""
    if estimate_s <= 0:
        return max_samples
    wanted = math.ceil(min_run_time_s / estimate_s)
    return max(min_samples, min(max_samples, wanted))


def warm_up(
    fn: Callable[[], object], timer: Timer, warmup_s: float, before_sample: Optional[Callable[[], None]],
    min_calls: int = 1,
) -> "tuple[int, float]":
    """Call fn at least `min_calls` times (at least once) and until warmup_s of calls have passed; return
    (calls, per-call estimate in s).

    The estimate is the median of the warm-up calls after the first (the first pays for lazy loading,
    compilation and autotuning), or the first call alone when it was the only one."""
    durations: list[float] = []
    while len(durations) < max(1, min_calls) or sum(durations) < warmup_s:
        if before_sample is not None:
            before_sample()
        durations.append(timer.once(fn))
    steady = durations[1:] or durations
    return len(durations), float(np.median(steady))


def time_callable(
    fn: Callable[[], object],
    *,
    device: str,
    min_run_time_s: float = 0.5,
    warmup_s: float = 0.1,
    min_samples: int = 10,
    max_samples: int = 1000,
    before_sample: Optional[Callable[[], None]] = None,
    min_warmup_calls: int = 1,
) -> TimingStats:
    """Warm fn up (at least `min_warmup_calls` calls and `warmup_s` seconds), pick the sample count from the
    time budget, and time every sample on `device`.

    `before_sample` (e.g. resetting gradients) runs before every call, outside the timed region."""
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples} and {max_samples}")
    timer = timer_for(device)
    calls, estimate_s = warm_up(fn, timer, warmup_s, before_sample, min_warmup_calls)
    n = sample_count(estimate_s, min_run_time_s, min_samples, max_samples)
    samples = timer.samples(fn, n, before_sample)
    return TimingStats(
        samples_ms=tuple(float(s) for s in samples), timer=timer.name, threads=torch.get_num_threads(),
        warmup_calls=calls,
    )
