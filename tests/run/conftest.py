"""Shared fixtures of the run tests."""

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="module")
def write_plugin(tmp_path_factory):
    """write_plugin(folder, name, source): the source written to a file `name` in a fresh temporary folder
    named after `folder`; returns the file's path (a string, as --plugin takes it)."""

    def write(folder: str, name: str, source: str) -> str:
        path = tmp_path_factory.mktemp(folder) / name
        path.write_text(source)
        return str(path)

    return write


@pytest.fixture
def killed_driver_env():
    """The environment for a driver the test kills with SIGKILL: TMPDIR is a fresh folder, removed after the
    test, so the temporary folders a killed driver cannot remove (cab-cell-*, cab-gates-*, cab-pool-*) do not
    pile up in the system's. Under the system's temporary folder, not pytest's deeper tmp_path: the
    forkserver's AF_UNIX socket path must stay under 108 bytes."""
    folder = tempfile.mkdtemp(prefix="cab-test-")
    yield {**os.environ, "TMPDIR": folder}
    shutil.rmtree(folder, ignore_errors=True)
