"""Config edge cases (issue 21, item 8): each is one located ConfigError (exit status 2), never a
traceback, an exhausted memory or a silent empty run."""

from __future__ import annotations

import pytest

from cab import registry
from cab.cli import main
from cab.config import ConfigError, load_config

BASE = "name: edge\nattentions: [vanilla]\n"


def write(tmp_path, text: str, name: str = "grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(path, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in (str(path), *needles):
        assert needle in message, message
    return message


def test_deep_nesting_is_a_config_error(tmp_path):
    message = refused(write(tmp_path, "a: " + "[" * 20000 + "]" * 20000 + "\n"), "nested too deeply")
    assert len(message.splitlines()) == 1


def test_a_device_or_huge_file_is_refused_without_reading_it(tmp_path, capsys):
    assert main(["run", "/dev/zero"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(11 * 2**20)
    refused(big, "larger than 10 MiB")


def test_a_missing_plugin_module_is_a_config_error(tmp_path, capsys):
    path = write(tmp_path, BASE + "plugins: [no_such_module]\ncheck: {}\n")
    refused(path, "no such plugin module: no_such_module", "plugins[0]")
    assert main(["run", str(path), "--db", str(tmp_path / "db.sqlite"), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such plugin module" in err


def test_a_plugin_that_is_not_a_python_file(tmp_path):
    refused(write(tmp_path, BASE + "plugins: [/etc/passwd]\ncheck: {}\n"), "not a Python file")
    errors = registry.load_plugin("/etc/passwd")
    assert errors and "not a Python file" in errors[0].message and "AttributeError" not in errors[0].message


def test_a_plugin_that_fails_half_way_is_unregistered(tmp_path):
    plugin = tmp_path / "half.py"
    plugin.write_text("import cab\nfrom cab.attention.exact import VanillaAttention as Vanilla\n\n"
                      "@cab.register_attention('half_first', family='exact', exact=True)\n"
                      "class First(Vanilla):\n    pass\n\n"
                      "raise RuntimeError('fails after registering half_first')\n")
    refused(write(tmp_path, BASE.replace("[vanilla]", "[half_first]") + f"plugins: [{plugin}]\ncheck: {{}}\n"),
            "half_first", "fails after registering")
    assert "half_first" not in registry.names()


def test_an_empty_kv_heads_list_is_located(tmp_path):
    refused(write(tmp_path, BASE + "bench:\n  lengths: [8]\n  kv_heads: []\n"), "bench.kv_heads", "non-empty")


def test_a_decode_only_bench_over_noncausal_patterns_is_an_empty_grid(tmp_path):
    path = write(tmp_path, BASE + "patterns: [NS, NC]\nbench:\n  lengths: [8]\n  modes: [decode]\n")
    refused(path, "bench.modes", "the bench grid is empty, because")


def test_a_grid_that_plans_no_cell_is_an_error(tmp_path, capsys, monkeypatch):
    import cab.run

    monkeypatch.setattr(cab.run, "expand", lambda config: [])
    path = write(tmp_path, BASE + "check: {}\n")
    assert main(["run", str(path), "--db", str(tmp_path / "db.sqlite"), "--no-report"]) == 2
    assert "the grid is empty" in capsys.readouterr().err
