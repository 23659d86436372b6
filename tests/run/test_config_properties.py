"""Property-based tests (hypothesis) of config parsing and grid expansion: valid configs expand to the
number of cells their axes multiply to, with unique keys that do not depend on the run, the YAML layout
or the order of mapping keys; anything malformed (arbitrary text, wrong types, unknown keys, empty lists,
alias bombs) is a ConfigError, never another exception; huge grids are refused above max_cells before
any cell is built, and expansion below it is lazy."""

import itertools
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cab import config as config_module
from cab import registry
from cab.config import (
    BenchSection,
    CheckSection,
    ConfigError,
    ExecutorSection,
    config_model,
    loads_config,
    parse_config,
)
from cab.grid import expand, iter_cells
from cab.patterns import Pattern

registry.discover([])
SECTION_MODULE_SECTIONS = {"tasks"}  # registered by cab.tasks when a config names it
ATTENTIONS = ["vanilla", "sdpa", "memory_efficient"]
PATTERNS = ["NS", "CS", "NC", "CC"]
MODES = ["fwd", "fwd_infer", "bwd", "fwdbwd", "decode"]
DTYPES = ["float32", "float64", "bfloat16", "float16"]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _subset(items):
    return st.lists(st.sampled_from(items), min_size=1, max_size=len(items), unique=True)


@st.composite
def configs(draw):
    """A valid config mapping with a check and/or a bench section."""
    data = {"name": draw(st.text(string.ascii_letters, min_size=1, max_size=8)),
            "attentions": draw(_subset(ATTENTIONS)), "patterns": draw(_subset(PATTERNS)),
            "seed": draw(st.integers(0, 10**6)), "threads": 1}
    if draw(st.booleans()):
        data["check"] = {"dtype": draw(st.sampled_from(DTYPES))}
    if draw(st.booleans()) or "check" not in data:
        data["bench"] = {
            "lengths": draw(st.lists(st.integers(1, 1 << 17), min_size=1, max_size=6)),
            "modes": draw(_subset(MODES)), "dtypes": draw(_subset(DTYPES)),
            "kv_ratio": draw(st.sampled_from([0.5, 1.0, 2.0, 1.5])), "trials": draw(st.integers(1, 3)),
            "heads": 4, "kv_heads": draw(st.sampled_from([1, 2, 4])),
        }
        if set(data["bench"]["modes"]) == {"decode"} and not any(Pattern.parse(p).causal for p in data["patterns"]):
            data["bench"]["modes"].append("fwd")  # decode alone over noncausal patterns is an empty grid: refused
    return data


def expected_size(data) -> int:
    """The number of cells, counted from the axes independently of the expander."""
    patterns = [Pattern.parse(p) for p in dict.fromkeys(data["patterns"])]
    n = 0
    if "check" in data:
        n += len(data["attentions"]) * len(patterns)
    if "bench" in data:
        bench = data["bench"]
        pattern_modes = sum(1 for p, m in itertools.product(patterns, bench["modes"]) if m != "decode" or p.causal)
        n += len(data["attentions"]) * len(set(bench["lengths"])) * len(bench["dtypes"]) * pattern_modes
    return n


def _load(data) -> "list":
    return expand(loads_config(yaml.safe_dump(data)))


@FAST
@given(configs())
def test_expansion_size_unique_keys_and_determinism(data):
    cells = _load(data)
    keys = [c.key for c in cells]
    assert len(cells) == expected_size(data)
    assert len(set(keys)) == len(keys)
    assert [c.key for c in _load(data)] == keys  # same config, same keys in the same order
    reordered = dict(reversed(list(data.items())))  # mapping order and YAML layout do not matter
    flow = loads_config(yaml.safe_dump(reordered, default_flow_style=True))
    assert [c.key for c in expand(flow)] == keys


@FAST
@given(configs(), st.integers(2, 5))
def test_trials_shuffle_the_order_but_not_the_cells(data, trials):
    data.setdefault("bench", {"lengths": [16], "modes": ["fwd"]})
    once = {**data, "bench": {**data["bench"], "trials": 1}}
    shuffled = {**data, "bench": {**data["bench"], "trials": trials}}
    plain, mixed = _load(once), _load(shuffled)
    assert sorted(c.key for c in mixed) == sorted(c.key for c in plain)
    assert [c.key for c in _load(shuffled)] == [c.key for c in mixed]  # the shuffle is seeded
    assert all(c.options.get("trials") == trials for c in mixed if c.kind == "bench")


@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_is_a_config_error_or_a_config(text):
    try:
        expand(loads_config(text))
    except ConfigError:
        pass


LEAVES = [("name",), ("patterns",), ("seed",), ("threads",), ("attentions",), ("bench", "lengths"),
          ("bench", "modes"), ("bench", "trials"), ("bench", "kv_ratio"), ("bench", "heads"), ("check", "dtype"),
          ("bench", "max_memory_bytes"), ("executor", "memory_limit_bytes"), ("executor", "timeout_s")]
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5),
                       st.lists(st.integers(-2, 2), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                 max_size=2))


def _with_leaf(data, leaf, value):
    target = data
    for part in leaf[:-1]:
        target = target.setdefault(part, {"lengths": [8]} if part == "bench" else {})
    target[leaf[-1]] = value
    return data


@FAST
@given(configs(), st.sampled_from(LEAVES), ODD_VALUES)
def test_odd_values_are_a_config_or_a_located_config_error(data, leaf, value):
    """Any value anywhere: a config, or a ConfigError located at a key of the file, never another exception."""
    try:
        expand(loads_config(yaml.safe_dump(_with_leaf(data, leaf, value))))
    except ConfigError as exc:
        assert exc.key is None or exc.key.split(".")[0].split("[")[0] in data, exc


# a value no leaf of LEAVES takes: a mapping, a list of mappings, a boolean (never a count or a name), text
# where a number or a list is due
def _wrong_values(leaf):
    wrong = [st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
             st.lists(st.fixed_dictionaries({"x": st.integers()}), min_size=1, max_size=2), st.booleans()]
    if leaf != ("name",):
        wrong.append(st.text("?!*#%", min_size=1, max_size=4))  # no pattern, mode, dtype or attention name
    return st.one_of(wrong)


@FAST
@given(configs(), st.sampled_from(LEAVES).flatmap(lambda leaf: st.tuples(st.just(leaf), _wrong_values(leaf))))
def test_wrong_types_are_refused_naming_the_key(data, leaf_value):
    leaf, value = leaf_value
    path = ".".join(leaf)
    with pytest.raises(ConfigError) as info:
        expand(loads_config(yaml.safe_dump(_with_leaf(data, leaf, value))))
    key = info.value.key or ""
    assert key == path or key.startswith((path + "[", path + ".")), (key, str(info.value))


SCOPES = {(): config_model, ("bench",): lambda: BenchSection, ("check",): lambda: CheckSection,
          ("executor",): lambda: ExecutorSection}


@FAST
@given(configs(), st.sampled_from(list(SCOPES)), st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_unknown_keys_are_refused_by_name(data, where, key):
    if key in SCOPES[where]().model_fields or key in SECTION_MODULE_SECTIONS:
        return
    target = data
    for part in where:
        target = target.setdefault(part, {"lengths": [8]} if part == "bench" else {})
    target[key] = 1
    with pytest.raises(ConfigError, match=f"unknown key {key!r} in {'.'.join(where) or 'the top level'}") as info:
        loads_config(yaml.safe_dump(data))
    assert info.value.key == ".".join(where + (key,))


@pytest.mark.parametrize("key", [("patterns",), ("attentions",), ("bench", "lengths"), ("bench", "modes"),
                                 ("bench", "dtypes")])
def test_empty_lists_are_refused(key):
    data = {"name": "t", "attentions": ["vanilla"], "bench": {"lengths": [8]}}
    target = data
    for part in key[:-1]:
        target = target[part]
    target[key[-1]] = []
    with pytest.raises(ConfigError, match="non-empty list|expected 'all' or a list") as info:
        loads_config(yaml.safe_dump(data))
    assert info.value.key == ".".join(key)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 10**4))
def test_huge_grids_are_refused_above_max_cells_before_any_cell_is_built(n_lengths, max_cells):
    data = {"name": "huge", "attentions": ATTENTIONS, "patterns": PATTERNS, "max_cells": max_cells,
            "bench": {"lengths": list(range(1, n_lengths + 1)), "modes": MODES, "dtypes": DTYPES}}
    size = expected_size(data)
    config = parse_config(data)
    if size > max_cells:
        with pytest.raises(ConfigError, match=f"expands to {size:,} cells.*max_cells = {max_cells:,}") as info:
            iter_cells(config)
        assert info.value.key == "max_cells"
    else:
        count, cells = iter_cells(config)
        assert count == size and next(cells).kind == "bench"


def test_expansion_below_the_limit_is_lazy():
    lengths = list(range(1, 100_001))  # 100,000 lengths x 4 patterns x 5 modes x 4 dtypes x 3 attentions
    config = parse_config({"name": "lazy", "attentions": ATTENTIONS, "max_cells": 10**10,
                           "bench": {"lengths": lengths, "modes": MODES, "dtypes": DTYPES}})
    count, cells = iter_cells(config)
    assert count == 3 * 100_000 * 4 * (4 * 4 + 2)  # decode only for CS and CC
    first = list(itertools.islice(cells, 5))
    assert [c.lq for c in first] == [1, 1, 1, 1, 1] and len({c.key for c in first}) == 5


@pytest.mark.parametrize("text, message", [
    ("a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
     "more than 10,000 values"),
    ("name: &n [1, *n]\n", "refers to a value that contains it"),
    ("? [a, b]\n: 1\n", "a key must be a plain name"),
    ("name: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),
    ("name: t\nname: u\ncheck: {}\n", "duplicate key 'name'"),
])
def test_hostile_yaml_is_a_config_error(text, message, monkeypatch):
    monkeypatch.setattr(config_module, "MAX_DOCUMENT_NODES", 10_000)  # the bomb expands to 2 million
    with pytest.raises(ConfigError, match=message):
        loads_config(text)


@given(st.integers(1, 10**6), st.sampled_from([("", 1), ("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30),
                                                ("kB", 10**3), ("MB", 10**6), ("GB", 10**9)]), st.booleans())
def test_sizes_with_units(n, unit, space):
    suffix, factor = unit
    text = f"{n}{' ' if space else ''}{suffix}"
    config = loads_config(yaml.safe_dump({"name": "t", "check": {}, "executor": {"memory_limit_bytes": text}}))
    assert config.executor.memory_limit_bytes == n * factor


@pytest.fixture
def section_registry(monkeypatch):
    """Register sections into copies of the registries, restored after the test."""
    from cab import grid

    monkeypatch.setattr(config_module, "SECTIONS", config_module.SECTIONS.copy())
    monkeypatch.setattr(grid, "EXPANDERS", grid.EXPANDERS.copy())
    config_module._config_model.cache_clear()
    yield grid.register_section
    config_module._config_model.cache_clear()


def test_a_registered_section_is_parsed_and_expanded(section_registry, monkeypatch):
    from cab.cells import Cell
    from cab.config import Section

    class RepeatSection(Section):
        repeats: int = 1

    def expand_repeats(config, section):
        cells = [Cell(kind="check", attention=e.name, pattern=p.value, seed=config.seed + i)
                 for e in config.attention_entries(section) for p in config.patterns_of(section)
                 for i in range(section.repeats)]
        return len(cells), iter(cells)

    section_registry("repeat", RepeatSection, expand_repeats)
    text = "name: t\nattentions: [vanilla, sdpa]\npatterns: [NS]\ncheck: {}\nrepeat: {repeats: 3, patterns: [CS]}\n"
    cells = expand(loads_config(text))
    assert [(c.attention, c.pattern, c.seed) for c in cells] == [
        ("vanilla", "NS", 0), ("sdpa", "NS", 0),  # check first: sections expand in registration order
        ("vanilla", "CS", 0), ("vanilla", "CS", 1), ("vanilla", "CS", 2),
        ("sdpa", "CS", 0), ("sdpa", "CS", 1), ("sdpa", "CS", 2)]
    with pytest.raises(ConfigError, match="unknown key 'repets' in repeat; did you mean 'repeats'"):
        loads_config("name: t\nrepeat: {repets: 3}\n")
    with pytest.raises(ConfigError, match="at least one of the sections `check`, `bench`.*`repeat`"):
        loads_config("name: t\n")
    with pytest.raises(ValueError, match="already defined"):
        section_registry("bench", RepeatSection, expand_repeats)
    with pytest.raises(ValueError, match="already defined"):
        section_registry("executor", RepeatSection, expand_repeats)
    with pytest.raises(TypeError, match="must subclass cab.config.Section"):
        section_registry("other", dict, expand_repeats)
