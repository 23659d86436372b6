"""Lets `pytest benchmarks --benchmark-only` run although the project's addopts pass --benchmark-disable
(which keeps the unit suite in tests/ from timing anything): here, --benchmark-only turns benchmarks on."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
