"""The example plugin package: installing it makes its attention appear in `cab list` via the entry point."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.paths import ROOT

PACKAGE = ROOT / "examples" / "plugin_package"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Install the example package into a private directory (not the shared venv), built from a private copy:
    under pytest-xdist each worker runs this fixture, and setuptools' in-tree build folder is not safe to
    share between two builds at once."""
    source = tmp_path_factory.mktemp("source") / PACKAGE.name
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, f"pip could not install the example package:\n{done.stdout}\n{done.stderr}"
    return target


def _cab(args, site=None):
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "cab.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_entry_point_registers_attention(installed):
    before = json.loads(_cab(["list", "--json"]).stdout)
    assert "example_linear" not in {a["name"] for a in before}
    listed = _cab(["list", "--json"], site=installed)
    assert listed.returncode == 0, listed.stderr
    spec = {a["name"]: a for a in json.loads(listed.stdout)}["example_linear"]
    assert spec["family"] == "linear" and spec["patterns"] == ["NS", "CS", "NC", "CC"]
    assert spec["source"].startswith("entry point 'example_linear'") and "cab-example-plugin" in spec["source"]
    assert "Katharopoulos" in spec["citation"]


def test_plugin_named_twice_is_an_error_naming_both_sources(installed):
    plugin_file = PACKAGE / "src" / "cab_example_plugin" / "__init__.py"
    result = _cab(["list", "--plugin", str(plugin_file)], site=installed)
    assert result.returncode != 0
    assert "registered twice" in result.stderr and "entry point 'example_linear'" in result.stderr
    assert str(plugin_file) in result.stderr
    assert "vanilla" in result.stdout  # the other attentions are still listed
