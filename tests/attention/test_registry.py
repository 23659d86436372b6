"""Registry: registration metadata, lookup errors, hyper-parameters, duplicates and plugin loading."""

import textwrap

import pytest

import cab
from cab import registry


@pytest.fixture
def scratch_names():
    created = []
    yield created
    for name in created:
        registry.unregister_attention(name)


def _define(name, **kw):
    @cab.register_attention(name, family="test", exact=False, **kw)
    class Scratch(cab.Attention):
        """A scratch attention for registry tests."""

        def __init__(self, pattern, num_heads, head_dim, width: int = 3, gain: float = 1.0):
            super().__init__(pattern, num_heads, head_dim)

        def forward(self, q, k, v, key_padding_mask=None):
            return q

    return Scratch


def test_metadata_and_hparams(scratch_names):
    scratch_names.append("scratch_meta")
    cls = _define("scratch_meta", patterns=("NS", "cs"), unsupported={"NC": "no cross variant"})
    spec = cab.get_spec("scratch_meta")
    assert spec.patterns == (cab.Pattern.NS, cab.Pattern.CS)
    assert spec.hparams == {"width": 3, "gain": 1.0}
    assert cls.name == "scratch_meta" and not spec.has_reference
    assert spec.to_dict()["unsupported"] == {"NC": "no cross variant"}
    assert "scratch" in spec.description.lower()


def test_undeclared_pattern_raises_with_names(scratch_names):
    scratch_names.append("scratch_pat")
    _define("scratch_pat", patterns=("NS",), unsupported={"CS": "pools over all queries"})
    with pytest.raises(cab.UnsupportedPattern) as info:
        cab.create_attention("scratch_pat", "CS", 2, 8)
    message = str(info.value)
    assert "scratch_pat" in message and "CS" in message and "NS" in message and "pools over" in message


def test_unknown_name_and_hparam_suggest():
    with pytest.raises(cab.UnknownAttention, match="did you mean 'sdpa'"):
        cab.create_attention("sdpaa", "NS", 2, 8)
    with pytest.raises(registry.UnknownHyperparameter, match="did you mean 'query_chunk_size'"):
        cab.create_attention("memory_efficient", "NS", 2, 8, query_chunk=4)


def test_duplicate_names_both_sources(scratch_names):
    scratch_names.append("scratch_dup")
    _define("scratch_dup")
    with pytest.raises(cab.DuplicateAttention) as info:
        _define("scratch_dup")
    assert str(info.value).count("module") >= 2 and "scratch_dup" in str(info.value)
    with pytest.raises(cab.DuplicateAttention, match="vanilla"):
        _define("vanilla")


def test_decorator_rejects_non_attention():
    with pytest.raises(TypeError):
        cab.register_attention("scratch_bad", family="x", exact=False)(object)
    with pytest.raises(ValueError):
        cab.register_attention("bad name!", family="x", exact=False)


def test_plugin_file_registers_and_failures_are_reported(tmp_path, scratch_names):
    good = tmp_path / "good_plugin.py"
    good.write_text(textwrap.dedent('''
        import cab
        @cab.register_attention("scratch_plugin", family="test", exact=False)
        class P(cab.Attention):
            def __init__(self, pattern, num_heads, head_dim):
                super().__init__(pattern, num_heads, head_dim)
            def forward(self, q, k, v, key_padding_mask=None):
                return q
    '''))
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import cab\nraise RuntimeError('plugin exploded')\n")
    dup = tmp_path / "dup_plugin.py"
    dup.write_text(good.read_text())
    scratch_names.append("scratch_plugin")
    assert registry.load_plugin(str(good)) == []
    assert "plugin file" in cab.get_spec("scratch_plugin").source
    errors = registry.load_plugin(str(bad)) + registry.load_plugin(str(dup)) + registry.load_plugin("no_such_module_x")
    assert len(errors) == 3
    assert "plugin exploded" in errors[0].message and "Traceback" in errors[0].traceback
    assert "registered twice" in errors[1].message and str(good.resolve()) in errors[1].message
    assert "ModuleNotFoundError" in errors[2].message
    assert "vanilla" in registry.names()  # the other attentions are still there
