"""The suite's own rules (tests/conftest.py): every test starts from the same seeded random state, and under
CI=true a skip fails unless it names a missing CUDA device or GPU."""

import pytest

from tests.paths import TESTS

pytest_plugins = ["pytester"]

SUITE = """
import random

import numpy as np
import pytest
import torch

DRAWS = []


@pytest.mark.parametrize("run", [0, 1])
def test_draws(run):
    DRAWS.append((random.random(), float(np.random.rand()), torch.rand(3).tolist()))
    torch.rand(100)  # consume more: the next test must not see the difference
    random.random()


def test_same_draws_in_every_test():
    assert len(DRAWS) == 2 and DRAWS[0] == DRAWS[1]


def test_needs_gpu():
    pytest.skip("needs a CUDA device")


def test_needs_cpu_feature():
    pytest.skip("this CPU has no 256-bit vector ISA")


@pytest.mark.skipif(True, reason="the fancy package is not installed")
def test_needs_package():
    pass


def test_importorskip():
    pytest.importorskip("no_such_module_in_this_venv")


@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_every_test_starts_from_the_same_seed(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    suite.runpytest("-p", "no:cacheprovider", "-k", "draws").assert_outcomes(passed=3)


def test_outside_ci_skips_are_skips(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3, skipped=4, xfailed=1)


def test_under_ci_only_missing_hardware_may_skip(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=3, skipped=2, failed=1, errors=1, xfailed=1)  # a skip in setup: an error
    result.stdout.fnmatch_lines(["*SKIPPED*needs a CUDA device*"])
    result.stdout.fnmatch_lines(["*SKIPPED*this CPU has no 256-bit vector ISA*"])
    result.stdout.fnmatch_lines(["*skipped under CI=true: the fancy package is not installed*"])
    result.stdout.fnmatch_lines(["*skipped under CI=true: could not import 'no_such_module_in_this_venv'*"])


def test_xdist_units_are_whole_files_for_process_and_shared_state_tests_and_single_tests_otherwise(pytester):
    """The units the suite's xdist scheduler hands out: a process test's file, a shared-state module's file,
    any other test alone; `--dist loadgroup` gets that scheduler, other modes xdist's own."""
    from tests.conftest import pytest_xdist_make_scheduler, xdist_scope

    assert xdist_scope("tests/run/test_resume.py::test_sigkill[pool]") == "tests/run/test_resume.py"
    assert xdist_scope("tests/report/test_browser.py::test_page") == "tests/report/test_browser.py"
    assert xdist_scope("tests/attention/test_flash.py::test_flex[NS]") == "tests/attention/test_flash.py"
    assert xdist_scope("tests/attention/test_exact.py::test_z[a]") == "tests/attention/test_exact.py::test_z[a]"
    config = pytester.parseconfig("-p", "xdist", "--tx", "2*popen", "--dist", "loadgroup")
    scheduler = pytest_xdist_make_scheduler(config, log=None)
    assert scheduler._split_scope("tests/kernels/test_interpret.py::test_w[x]") == "tests/kernels/test_interpret.py"
    other = pytester.parseconfig("-p", "xdist", "--tx", "2*popen", "--dist", "load")
    assert pytest_xdist_make_scheduler(other, log=None) is None


def test_the_suite_runs_without_xdist(suite, monkeypatch):
    """The scheduler hook is optional: `pytest -p no:xdist` (one process, e.g. to profile) loads the conftest."""
    monkeypatch.delenv("CI", raising=False)
    suite.runpytest("-p", "no:xdist", "-p", "no:cacheprovider", "-k", "draws").assert_outcomes(passed=3)
