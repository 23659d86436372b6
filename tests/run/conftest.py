"""Shared fixtures of the run tests."""

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
