"""Suite-wide rules: every test starts from the same random state, and under CI (CI=true, set by .ci/run) a
skip is a failure unless it names missing hardware: a CUDA device or GPU (CI has none), or a feature this
CPU or operating-system kernel lacks. Everything else the suite needs, scripts/setup.sh installs, so a skip
there would hide a property nobody checked."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

SEED = 20240518
# the only skips CI may take: the ones that need hardware CI does not have (a GPU, a feature the machine's
# CPU or operating-system kernel lacks: reasons starting "this CPU" / "this kernel")
ALLOWED_IN_CI = re.compile(r"\b(CUDA|GPU)\b|^this (CPU|kernel)\b", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# Under pytest-xdist (`make test` runs `pytest -n auto --dist loadgroup`), tests are spread one by one except:
# - a module whose tests share what one process builds (a module-scoped fixture, torch.compile's in-process
#   kernels) runs on one worker, so that it is built once rather than once per worker (SHARED_STATE);
# - the tests that start processes, executors, forkservers, Ray or signals run file by file: a file's tests
#   one after another on one worker (their module fixtures, such as a Ray instance, are built once), while
#   other files' go to the other workers (PROCESS_TESTS).
# The groups are drawn by the scheduler below from the node ids: xdist's own `xdist_group` marks rename node
# ids, which pytest 9 no longer lets them do (the marks are silently ignored). Each worker's torch gets its
# share of the cores.
PROCESS_TESTS = ("tests/run/", "tests/report/test_fidelity_isolation.py", "tests/report/test_browser.py")
SHARED_STATE = ("tests/attention/test_flash.py", "tests/attention/test_plugin_package.py",
                "tests/kernels/test_interpret.py", "tests/report/test_rankings.py")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def xdist_scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its file for the grouped files above, else the test alone."""
    path = nodeid.split("::")[0]
    return path if path.startswith(PROCESS_TESTS) or path in SHARED_STATE else nodeid


@pytest.hookimpl(optionalhook=True)  # xdist's hook: `pytest -p no:xdist` runs the suite in one process
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        """xdist's scope scheduling (the largest units first) with the units of `xdist_scope`."""

        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return FileGroups(config, log)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed Python's, NumPy's and torch's global generators before every test, so that what a test draws
    does not depend on which tests ran before it (or on -k, -x, the order of files)."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if ALLOWED_IN_CI.search(reason):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason}\n"
                       "CI installs everything the suite needs but a GPU (scripts/setup.sh); a test may skip in CI "
                       "only for want of a CUDA device or GPU.")
