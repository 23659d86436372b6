"""Config loading: every malformed file gives one ConfigError naming the file, the key and the line."""

import textwrap

import pytest

from cab import registry
from cab.config import ConfigError, load_config, loads_config
from cab.grid import expand
from cab.patterns import Pattern

GOOD = """\
name: t
attentions: [vanilla, {name: memory_efficient, hparams: {query_chunk_size: 16}, label: me-16}]
patterns: [ns, causal self]
threads: 1
check:
  dtype: float64
bench:
  lengths: [32, 64]
  modes: [fwd]
"""


def _write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path, text) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        expand(load_config(path))
    assert str(path) in str(info.value)
    return info.value


def test_good_config_is_parsed(tmp_path):
    config = load_config(_write(tmp_path, GOOD))
    assert config.name == "t" and config.threads == 1
    assert config.patterns == [Pattern.NS, Pattern.CS]
    assert [e.name for e in config.attentions] == ["vanilla", "memory_efficient"]
    assert config.attentions[1].hparams == {"query_chunk_size": 16}
    assert config.check.dtype == "float64" and config.bench.lengths == [32, 64]
    assert config.executor.kind == "local" and config.output.store == "results/cab.sqlite"


@pytest.mark.parametrize(
    "text, key, line, fragments",
    [
        ("name: t\nbench:\n  lenghts: [64]\n", "bench.lenghts", 3, ["unknown key 'lenghts' in bench",
                                                                   "did you mean 'lengths'"]),
        ("name: t\ncheck: {}\npaterns: [NS]\n", "paterns", 3, ["did you mean 'patterns'"]),
        ("name: t\ncheck: {}\nattentions: [vanila]\n", "attentions[0]", 3, ["unknown attention 'vanila'",
                                                                            "did you mean 'vanilla'"]),
        ("name: t\ncheck: {}\nexclude: [sdpaa]\n", "exclude[0]", 3, ["did you mean 'sdpa'"]),
        ("name: t\ncheck:\n  attentions: [{nmae: vanilla}]\n", "check.attentions[0].nmae", 3,
         ["did you mean 'name'"]),
        ("name: t\ncheck: {}\npatterns: [NS, XS]\n", "patterns[1]", 3, ["unknown pattern 'XS'"]),
        ("name: t\nbench:\n  lengths: [256, abc]\n", "bench.lengths[1]", 3,
         ["expected a positive integer, got 'abc'"]),
        ("name: t\nbench:\n  lengths: 256\n", "bench.lengths", 3, ["expected a list, got 256"]),
        ("name: t\nbench:\n  lengths: []\n", "bench.lengths", 3, ["non-empty list"]),
        ("name: t\nbench:\n  lengths: [64]\n  modes: [fw]\n", "bench.modes[0]", 4, ["unknown mode 'fw'",
                                                                                   "did you mean 'fwd'"]),
        ("name: t\nbench:\n  lengths: [64]\n  memory: maybe\n", "bench.memory", 4, ["true or false"]),
        ("name: t\nthreads: 0\ncheck: {}\n", "threads", 2, ["positive integer, got 0"]),
        ("name: t\ndevice: gpu\ncheck: {}\n", "device", 2, ["cpu, cuda or cuda:N"]),
        ("name: t\ncheck: {}\nattentions:\n  - name: memory_efficient\n    hparams: {query_chunk: 3}\n",
         "attentions[0].hparams.query_chunk", 5, ["no hyper-parameter 'query_chunk'", "query_chunk_size"]),
        ("name: t\ncheck: {}\nattentions: [vanilla, vanilla]\n", "attentions[1]", 3, ["listed twice"]),
        ("name: t\ncheck:\n  attentions: [vanilla]\n  exclude: [sdpa]\n", "check.exclude", 4,
         ["applies only to `attentions: all`"]),
        ("name: t\ncheck: {}\ncheck: {}\n", "check", 3, ["duplicate key 'check'"]),
        ("check: {}\n", "name", None, ["missing required key 'name'"]),
        ("name: t\nbench:\n  modes: [fwd]\n", "bench.lengths", 2, ["missing required key 'lengths'"]),
        ("name: t\nattentions: vanilla\ncheck: {}\n", "attentions", 2, ["expected 'all' or a list"]),
        ("name: t\nplugins: [missing_plugin.py]\ncheck: {}\n", "plugins[0]", 2, ["no such plugin file"]),
        ("name: t\nbench: {lengths: [64], heads: 4, kv_heads: 3}\n", "bench", 2, ["must divide heads"]),
        ("name: t\nmax_cells: 5\nattentions: [vanilla]\nbench:\n  lengths: [1, 2, 3]\n", "max_cells", 2,
         ["expands to 24 cells", "max_cells = 5"]),
    ],
)
def test_malformed_config_names_file_key_and_line(tmp_path, text, key, line, fragments):
    error = _error(tmp_path, text)
    assert error.key == key and error.line == line
    message = str(error)
    assert f"key {key}" in message and (line is None or f"line {line}," in message)
    for fragment in fragments:
        assert fragment in message


def test_default_grid_cap(tmp_path):
    lengths = ", ".join(str(n) for n in range(1, 9000))
    error = _error(tmp_path, f"name: t\nbench:\n  lengths: [{lengths}]\n")
    expected = len(registry.names()) * 4 * 8999 * 2  # attentions x patterns x lengths x default modes
    assert f"{expected:,} cells" in str(error) and "max_cells = 100,000" in str(error)


def test_unknown_key_is_reported_before_the_missing_one(tmp_path):
    error = _error(tmp_path, "name: t\nbench:\n  lenghts: [64]\n")
    first, second = str(error).splitlines()
    assert "unknown key 'lenghts'" in first and "missing required key 'lengths'" in second


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("name: t\nbench:\n  lengths: [1, 2\n  modes: x\n", 4, "invalid YAML"),
        ("name: t\n  bench: 3\n", 2, "invalid YAML"),
        ("", None, "the config file is empty"),
        ("- a\n- b\n", None, "expected a mapping of keys at the top level"),
        ("name: t\n", None, "no work"),
    ],
)
def test_unusable_files(tmp_path, text, line, fragment):
    error = _error(tmp_path, text)
    assert fragment in str(error) and error.line == line


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_plugin_attentions_and_relative_plugin_paths(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "cfg_plugin.py").write_text(textwrap.dedent("""\
        import cab

        @cab.register_attention("cfg_plugin_attn", patterns=("NS",), family="test", exact=False)
        class CfgPlugin(cab.Attention):
            def __init__(self, pattern, num_heads, head_dim, width: int = 2):
                super().__init__(pattern, num_heads, head_dim)

            def forward(self, q, k, v, key_padding_mask=None):
                return v
        """))
    config = load_config(_write(tmp_path, """\
        name: t
        plugins: [plugins/cfg_plugin.py]
        attentions: [{name: cfg_plugin_attn, hparams: {width: 4}}]
        check: {}
        """))
    assert config.plugins == [str((tmp_path / "plugins" / "cfg_plugin.py").resolve())]
    assert config.plugin_errors == []
    assert config.attentions[0].display_label == "cfg_plugin_attn(width=4)"


def test_broken_plugin_is_named_in_the_unknown_attention_error(tmp_path):
    (tmp_path / "broken_cfg_plugin.py").write_text("raise RuntimeError('plugin exploded')\n")
    error = _error(tmp_path, "name: t\nplugins: [broken_cfg_plugin.py]\nattentions: [from_broken]\ncheck: {}\n")
    assert "unknown attention 'from_broken'" in str(error) and "plugin exploded" in str(error)


def test_sections_override_the_top_level(tmp_path):
    config = load_config(_write(tmp_path, """\
        name: t
        attentions: all
        exclude: [sdpa]
        check: {}
        bench:
          attentions: [sdpa]
          patterns: [NC]
          lengths: [8]
        """))
    assert [e.name for e in config.attention_entries(config.check)] == [n for n in registry.names() if n != "sdpa"]
    assert config.patterns_of(config.check) == list(Pattern)
    assert [e.name for e in config.attention_entries(config.bench)] == ["sdpa"]
    assert config.patterns_of(config.bench) == [Pattern.NC]


@pytest.mark.parametrize("key, text", [("seed", "seed: {n}"), ("bench.lengths[0]", "bench: {{lengths: [{n}]}}"),
                                       ("bench.heads", "bench: {{lengths: [8], heads: {n}}}")])
def test_integers_the_store_cannot_hold_are_refused_with_their_key(key, text):
    with pytest.raises(ConfigError, match=r"at most 2\*\*63 - 1") as info:
        loads_config("name: t\nattentions: [vanilla]\n" + text.format(n=2**63) + "\n" +
                     ("check: {}\n" if key == "seed" else ""))
    assert info.value.key == key
    loads_config("name: t\nattentions: [vanilla]\nseed: " + str(2**63 - 1) + "\ncheck: {}\n")
