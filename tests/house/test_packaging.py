"""Installing cab never replaces a researcher's torch: the package asks for a range of versions (the exact
pin lives in scripts/setup.sh, for the CPU reference setup) and does not require triton."""

import re

import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tests.paths import ROOT


def _requirements() -> "dict[str, Requirement]":
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {(r := Requirement(text)).name: r for text in project["dependencies"]}


def test_torch_is_a_range_that_holds_the_builds_researchers_have():
    torch_requirement = _requirements()["torch"]
    assert not any(spec.operator in ("==", "===", "~=") for spec in torch_requirement.specifier)
    for version in ("2.5.0", "2.11.0", "2.13.0", "2.14.1", "2.11.0+cu128"):
        assert torch_requirement.specifier.contains(version), version
    assert torch_requirement.specifier.contains(Version(torch.__version__).base_version)  # the one we test


def test_triton_is_not_required_by_the_package():
    assert "triton" not in _requirements()


def test_setup_pins_torch_exactly_and_installs_it_before_cab():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    pinned = re.search(r'^TORCH_VERSION="(\d+\.\d+\.\d+)"$', script, re.MULTILINE)
    assert pinned and _requirements()["torch"].specifier.contains(pinned.group(1))
    assert script.index('install -q "torch==$TORCH_VERSION"') < script.index('install -q -e ".[test,ray]"')
