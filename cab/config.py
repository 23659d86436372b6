"""Grid configuration: the YAML schema (pydantic, unknown keys refused), loading, and located errors.

Every problem in a config file becomes one `ConfigError` naming the file, the key path and, when known,
the line: ``configs/x.yaml, line 7, key bench.lengths[1]: expected a positive integer, got 'abc'``.
Sections (`check`, `bench`, and any registered with `cab.grid.register_section`, e.g. `tasks`) each
describe one kind of cell; each may override the top-level `attentions` / `exclude` / `patterns`.
YAML is read with PyYAML's safe loader only: a config file can never construct Python objects.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from cab import registry
from cab.cells import BENCH_MODES, DTYPES
from cab.executors import EXECUTORS
from cab.patterns import Pattern
from cab.registries import Registry

DEFAULT_MAX_CELLS = 100_000

KeyPath = tuple  # a path into the YAML document: str keys and int list indices


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key path and the line."""

    def __init__(self, message: str, *, source: "str | None" = None, key: "str | None" = None,
                 line: "int | None" = None):
        self.source, self.key, self.line, self.detail = source, key, line, message
        where = ", ".join(
            part for part in (source, f"line {line}" if line else None, f"key {key}" if key else None) if part
        )
        super().__init__(f"{where}: {message}" if where else message)


# value checks with uniform, user-facing messages ----------------------------------------------------

def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# the largest integer the results store (SQLite INTEGER, 64-bit signed) holds: larger values are refused
# here, with their key, rather than after their cell ran
MAX_INTEGER = 2**63 - 1


def _integer(minimum: int, what: str):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected {what}, got {_got(value)}")
        if value > MAX_INTEGER:
            raise ValueError(f"expected {what} of at most 2**63 - 1 (what the results store holds), got {value}")
        return value
    return check


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number, got {_got(value)}")
    return float(value)


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _bytes(value: Any) -> int:
    """A positive byte count: a number (17179869184, 1.6e10) or a string with a unit ("16 GiB", "500MB")."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if match and match.group(2) in _BYTE_UNITS:
            value = float(match.group(1)) * _BYTE_UNITS[match.group(2)]
        else:
            raise ValueError(f"expected a size in bytes (a number, or e.g. '16 GiB', '500 MB'), got {_got(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < float("inf"):
        raise ValueError(f"expected a positive size in bytes, got {_got(value)}")
    if value > MAX_INTEGER:
        raise ValueError(f"expected a size of at most 2**63 - 1 bytes, got {_got(value)}")
    return int(value)


def _choice(options: "tuple[str, ...]", what: str):
    def check(value: Any) -> str:
        if isinstance(value, str) and value in options:
            return value
        near = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown {what} {_got(value)}{hint}; expected one of {', '.join(options)}")
    return check


def _device(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return value
    raise ValueError(f"expected a device: cpu, cuda or cuda:N, got {_got(value)}")


def _name(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"expected a non-empty string, got {_got(value)}")


PositiveInt = Annotated[int, BeforeValidator(_integer(1, "a positive integer"))]
NonNegativeInt = Annotated[int, BeforeValidator(_integer(0, "an integer >= 0"))]
PositiveFloat = Annotated[float, BeforeValidator(_positive_number)]
Bytes = Annotated[int, BeforeValidator(_bytes)]
Name = Annotated[str, BeforeValidator(_name)]
PatternItem = Annotated[Pattern, BeforeValidator(Pattern.parse)]
Mode = Annotated[str, BeforeValidator(_choice(BENCH_MODES, "mode"))]
DType = Annotated[str, BeforeValidator(_choice(DTYPES, "dtype"))]
ExecutorKind = Annotated[str, BeforeValidator(_choice(tuple(EXECUTORS), "executor kind"))]
Device = Annotated[str, BeforeValidator(_device)]


def _list_of(item: Any) -> Any:
    """A list type that refuses to be empty."""
    return Annotated[list[item], Field(min_length=1)]


PatternList = _list_of(PatternItem)
LengthList = _list_of(PositiveInt)
ModeList = _list_of(Mode)
DTypeList = _list_of(DType)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AttentionEntry(_Schema):
    """One attention of the grid: a registered name, hyper-parameters for its constructor, a display label."""

    name: Name
    hparams: dict[str, Any] = Field(default_factory=dict)
    label: str = ""

    @property
    def display_label(self) -> str:
        """The label, or `name(k=v, ...)` when hyper-parameters distinguish it from the defaults."""
        if self.label or not self.hparams:
            return self.label
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in sorted(self.hparams.items()))})"


def _selection_kind(value: Any) -> str:
    return "all" if isinstance(value, str) else "list"


def _normalise_selection(value: Any) -> Any:
    """`all`, or a list whose plain-string items are attention names."""
    if value == "all":
        return value
    if isinstance(value, str):
        raise ValueError(f"expected 'all' or a list of attention names, got {_got(value)} (write [{value}] "
                         "for a single attention)")
    if not isinstance(value, list):
        raise ValueError(f"expected 'all' or a list of attention names, got {_got(value)}")
    return [{"name": item} if isinstance(item, str) else item for item in value]


AttentionSelection = Annotated[
    Union[Annotated[Literal["all"], Tag("all")], Annotated[_list_of(AttentionEntry), Tag("list")]],
    Discriminator(_selection_kind),
    BeforeValidator(_normalise_selection),
]


class Section(_Schema):
    """What every cell section may override from the top level."""

    attentions: "AttentionSelection | None" = None
    exclude: "list[Name] | None" = None
    patterns: "PatternList | None" = None


class CheckSection(Section):
    """Conformance cells: one per attention x pattern (undeclared patterns are recorded as unsupported)."""

    dtype: DType = "float32"


class BenchSection(Section):
    """Timing cells: attention x pattern x length x mode x dtype.

    Mode `decode` times one incremental decoding step at each length (the context) and exists only for the
    causal patterns, so it adds no cell for NS or NC. `min_samples` sets the bench runner's floor of
    timed samples; `warmup_s` and `min_warmup_calls` its warm-up (default 0.1 s and at least one call).
    `trials` > 1 asks the bench runner to time each cell that many times, keeping every
    trial's samples, and lays the section's cells out in an order shuffled by the config's seed, so that no
    implementation always runs first or after the same neighbour. `max_memory_bytes` / `max_flops`: a
    cell whose attention declares a cost above either is recorded as `skipped` with the estimate
    (cab.budget). None of these changes a cell's key. `kv_heads` may be a list: each value is a
    grid axis point (MQA: 1, GQA: a divisor of heads), and attentions that do not support grouped queries
    get cells only where kv_heads == heads."""

    lengths: LengthList
    kv_ratio: PositiveFloat = 1.0
    batch: PositiveInt = 1
    heads: PositiveInt = 4
    kv_heads: "PositiveInt | _list_of(PositiveInt) | None" = None
    head_dim: PositiveInt = 64
    modes: ModeList = Field(default_factory=lambda: ["fwd", "fwdbwd"])
    dtypes: DTypeList = Field(default_factory=lambda: ["float32"])
    min_run_time_s: PositiveFloat = 0.5
    min_samples: "PositiveInt | None" = None
    warmup_s: "PositiveFloat | None" = None
    min_warmup_calls: "PositiveInt | None" = None
    trials: PositiveInt = 1
    memory: bool = True
    max_memory_bytes: "Bytes | None" = None
    max_flops: "PositiveFloat | None" = None

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> "BenchSection":
        for kv in self.kv_heads_list:
            if self.heads % kv:
                raise ValueError(f"kv_heads ({kv}) must divide heads ({self.heads})")
        return self

    @property
    def kv_heads_list(self) -> "list[int]":
        """Key/value head counts to sweep (grouped- and multi-query attention: kv_heads < heads); default
        one, equal to heads."""
        if self.kv_heads is None:
            return [self.heads]
        values = self.kv_heads if isinstance(self.kv_heads, list) else [self.kv_heads]
        return list(dict.fromkeys(values))


class ExecutorSection(_Schema):
    """How cells run: in this process (`local`), each in a fresh isolated process (`subprocess`), spread over
    `workers` warm isolated worker processes (`pool`; benchmark cells still run alone), or each in a fresh
    isolated process inside a Ray task (`ray`, on a local instance or the cluster at `address`).

    `timeout_s`: per-cell time limit. `memory_limit_bytes`: an isolated cell whose processes hold more
    resident memory than this is killed and recorded as `oom` with the measured size (not enforced by
    `local`). `grace_s`: start-up time an isolated cell gets on top of its timeout before a hard kill.
    `max_output_bytes`: an isolated cell that prints more than this is killed (`error`). `workers`: how many
    cells `pool` runs at once (default: one per usable core; with `threads: N` cells, at most cores / N)."""

    kind: ExecutorKind = "local"
    timeout_s: "PositiveFloat | None" = 300.0
    memory_limit_bytes: "Bytes | None" = None
    grace_s: PositiveFloat = 10.0
    max_output_bytes: Bytes = 64 * 2**20
    address: "Name | None" = None
    workers: "PositiveInt | None" = None

    @model_validator(mode="after")
    def _address_is_for_ray(self) -> "ExecutorSection":
        if self.address is not None and self.kind != "ray":
            raise ValueError(f"`address` is the Ray cluster to connect to; it needs kind: ray, not {self.kind!r}")
        return self

    def options(self) -> "dict[str, Any]":
        """Constructor options of the executor (cab.executors.get_executor), timeout and plugins aside."""
        return {"memory_limit_bytes": self.memory_limit_bytes, "grace_s": self.grace_s,
                "max_output_bytes": self.max_output_bytes, "address": self.address, "workers": self.workers}


class OutputSection(_Schema):
    """Where results go: the SQLite store and the leaderboard folder (relative to the working directory)."""

    store: Name = "results/cab.sqlite"
    report: Name = "results/leaderboard"


class Config(_Schema):
    """A whole grid file. `source` (the file) and the key-path -> line map travel with it for errors."""

    name: Name
    description: str = ""
    plugins: list[Name] = Field(default_factory=list)
    attentions: AttentionSelection = "all"
    exclude: list[Name] = Field(default_factory=list)
    patterns: PatternList = Field(default_factory=lambda: list(Pattern))
    device: Device = "cpu"
    threads: "PositiveInt | None" = None
    seed: NonNegativeInt = 0
    max_cells: PositiveInt = DEFAULT_MAX_CELLS
    check: "CheckSection | None" = None
    bench: "BenchSection | None" = None
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    output: OutputSection = Field(default_factory=OutputSection)

    _source: str = PrivateAttr(default="<config>")
    _lines: dict = PrivateAttr(default_factory=dict)
    _plugin_errors: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _has_work(self) -> "Config":
        if not self.sections():
            names = ", ".join(f"`{name}`" for name, _ in SECTIONS.ordered())
            raise ValueError(f"the config has no work: add at least one of the sections {names}")
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def plugin_errors(self) -> "list[registry.PluginError]":
        """Plugins that failed to load when the config was loaded (the driver reports them)."""
        return list(self._plugin_errors)

    @property
    def resolved_threads(self) -> int:
        """The CPU thread count cells run with: the configured one, or every core."""
        return self.threads or os.cpu_count() or 1

    def sections(self) -> "dict[str, Section]":
        """The cell sections present, in expansion order."""
        return {name: section for name, _ in SECTIONS.ordered() if (section := getattr(self, name, None)) is not None}

    def attention_entries(self, section: Section) -> "list[AttentionEntry]":
        """The attentions a section runs: its own list or the top level's, or every registered attention
        minus the excluded names when the selection is `all`."""
        selection = self.attentions if section.attentions is None else section.attentions
        if selection != "all":
            return list(selection)
        exclude = set(self.exclude if section.exclude is None else section.exclude)
        return [AttentionEntry(name=n) for n in registry.names() if n not in exclude]

    def patterns_of(self, section: Section) -> "list[Pattern]":
        return list(dict.fromkeys(self.patterns if section.patterns is None else section.patterns))

    def error(self, message: str, key: KeyPath = ()) -> ConfigError:
        """A ConfigError located at `key` in this config's file."""
        return ConfigError(message, source=self._source, key=format_key(key) or None, line=_line_of(self._lines, key))


# Cell sections, in expansion order: name -> schema. Other modules add theirs with
# `cab.grid.register_section` (which also registers the expander); SECTION_MODULES are imported, and the
# entry points of group "cab.sections" loaded, on the first look at the sections.
SECTION_MODULES = ("cab.training.expand",)
SECTION_ENTRY_POINTS = "cab.sections"
SECTIONS: "Registry[type[Section]]" = Registry("config section", modules=SECTION_MODULES,
                                               entry_points=SECTION_ENTRY_POINTS)
SECTIONS.add("check", CheckSection)
SECTIONS.add("bench", BenchSection)


def register_section_model(name: str, model: "type[Section]") -> None:
    """Accept a top-level config section `name` validated by `model` (a subclass of `Section`, so that it
    can override `attentions` / `exclude` / `patterns`). Registering the same model again is a no-op."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"a section name must be an identifier, got {name!r}")
    if not (isinstance(model, type) and issubclass(model, Section)):
        raise TypeError(f"section {name!r}: the model must subclass cab.config.Section, got {model!r}")
    if name in Config.model_fields or SECTIONS.peek(name) not in (None, model):
        raise ValueError(f"config section {name!r} is already defined")
    SECTIONS.add(name, model, f"module {model.__module__}")
    _config_model.cache_clear()


def config_model() -> "type[Config]":
    """The Config schema with every registered section (a subclass of Config)."""
    SECTIONS.load()
    return _config_model()


@functools.lru_cache(maxsize=None)
def _config_model() -> "type[Config]":
    extra = {name: (Optional[model], None) for name, model in SECTIONS.ordered() if name not in Config.model_fields}
    return create_model("Config", __base__=Config, __module__=__name__, **extra) if extra else Config


# YAML reading with line numbers --------------------------------------------------------------------

def format_key(path: KeyPath) -> str:
    """('bench', 'lengths', 1) -> 'bench.lengths[1]'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_of(lines: dict, path: KeyPath) -> "int | None":
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


MAX_DOCUMENT_NODES = 1_000_000  # values in a config once YAML aliases are expanded ("billion laughs" guard)


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict, source: str, budget: "list[int] | None" = None,
                 ancestors: "frozenset[int]" = frozenset()) -> None:
    """Record the 1-based line of every key and list item; refuse duplicate and non-scalar keys (YAML keeps
    the last duplicate), recursive aliases and documents that aliases expand past MAX_DOCUMENT_NODES."""
    budget = [MAX_DOCUMENT_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"the document expands to more than {MAX_DOCUMENT_NODES:,} values (through YAML "
                          "aliases?)", source=source, key=format_key(path) or None)
    if id(node) in ancestors:
        raise ConfigError("a YAML alias refers to a value that contains it", source=source,
                          key=format_key(path) or None, line=node.start_mark.line + 1)
    inner = ancestors | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("a key must be a plain name, not a list or a mapping", source=source,
                                  key=format_key(path) or None, line=line)
            key = key_node.value
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (first on line {seen[key]})", source=source,
                                  key=format_key(path + (key,)), line=line)
            seen[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, source, budget, inner)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), lines, source, budget, inner)


MAX_CONFIG_BYTES = 10 * 2**20  # a grid file is a few KiB; more is a wrong path (or /dev/zero)


def _read_yaml(path: Path) -> "tuple[Any, dict]":
    source = str(path)
    try:
        if path.exists() and not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
            raise ConfigError(f"the config path is {what}; give a YAML grid file such as configs/quick.yaml",
                              source=source)
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"the config file is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a grid file is a few "
                              "KiB: is this the right file?", source=source)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("no such config file", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file ({exc})", source=source) from None
    return _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> "tuple[Any, dict]":
    """(document, key path -> line) of YAML text, with PyYAML's safe loader (no Python object tags)."""
    lines: dict = {}
    try:
        loader = yaml.SafeLoader(text)  # refuses unprintable characters already
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _index_lines(node, (), lines, source)
        data = None if node is None else loader.construct_document(node)
    except RecursionError:
        raise ConfigError("invalid YAML: brackets or indentation nested too deeply", source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML: {problem}", source=source,
                          line=mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError("the config file is empty", source=source)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys at the top level, got {type(data).__name__}", source=source)
    return data, lines


# pydantic errors -> located messages ----------------------------------------------------------------

def _document_path(loc: tuple, data: Any) -> KeyPath:
    """The part of a pydantic error location that exists in the document (drops union tags)."""
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, (dict, list)):
            continue  # a union tag, or a key the schema added
        else:
            break
        path.append(part)
    return tuple(path)


def _model_in(annotation: Any) -> "type[BaseModel] | None":
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(path: KeyPath) -> "list[str]":
    model: "type[BaseModel] | None" = config_model()
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _describe(error: dict, path: KeyPath) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        parent = format_key(path[:-1]) or "the top level"
        near = difflib.get_close_matches(str(path[-1]), _allowed_keys(path[:-1]), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown key {path[-1]!r} in {parent}{hint}"
    if kind == "missing":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "too_short":
        return "expected a non-empty list"
    if kind == "list_type":
        return f"expected a list, got {_got(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {_got(value)}"
    if kind == "string_type":
        return f"expected a string, got {_got(value)}"
    if kind == "bool_type":
        return f"expected true or false, got {_got(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {_got(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_got(value)}"
    return f"{error['msg']}, got {_got(value)}"


def _validation_error(exc: ValidationError, data: Any, lines: dict, source: str) -> ConfigError:
    located = []
    # an unknown key first: it is usually the misspelling of the key reported missing
    for error in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = tuple(error["loc"])
        path = _document_path(loc, data)
        if error["type"] == "missing" and loc and path[-1:] != loc[-1:]:
            path += (loc[-1],)
        located.append(ConfigError(_describe(error, path), source=source, key=format_key(path) or None,
                                   line=_line_of(lines, path)))
    first = located[0]
    if len(located) == 1:
        return first
    combined = ConfigError(first.detail, source=first.source, key=first.key, line=first.line)
    combined.args = ("\n".join(str(e) for e in located),)
    return combined


# names that need the registry ------------------------------------------------------------------------

def _resolve_plugins(config: Config, base: Path) -> None:
    """Make relative plugin file paths absolute (relative to the config's folder, else to the working
    directory) so that worker processes find them; a missing plugin file is a config error."""
    resolved = []
    for i, spec in enumerate(config.plugins):
        if spec.endswith(".py") or "/" in spec or os.sep in spec:
            candidates = [Path(spec)] if Path(spec).is_absolute() else [base / spec, Path.cwd() / spec]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise config.error(f"no such plugin file: {spec}", ("plugins", i))
            if found.suffix != ".py":
                raise config.error(f"plugin {spec} is not a Python file (plugin files end in .py; a module is "
                                   "named without a path, e.g. my_package.attention)", ("plugins", i))
            spec = str(found.resolve())
        elif not _module_exists(spec):
            raise config.error(f"no such plugin module: {spec} (not importable here; a plugin file is a path "
                               "ending in .py)", ("plugins", i))
        resolved.append(spec)
    config.plugins = resolved


def _module_exists(name: str) -> bool:
    """Whether `import name` can find the module (without importing it; its parent packages are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _unknown(config: Config, exc: Exception, where: KeyPath) -> ConfigError:
    """An unknown-attention error, naming the plugins that failed to load (the name may have been theirs)."""
    failures = "".join(f" (plugin {e.source} failed to load: {e.message})" for e in config.plugin_errors)
    return config.error(f"{exc}{failures}", where)


def _check_exclude(config: Config, prefix: KeyPath, scope: "Config | Section") -> None:
    selection = config.attentions if scope.attentions is None else scope.attentions
    if scope.exclude and selection != "all":
        raise config.error("`exclude` applies only to `attentions: all`; remove the names from the list instead",
                           prefix + ("exclude",))
    for i, excluded in enumerate(scope.exclude or []):
        try:
            registry.get_spec(excluded)
        except registry.UnknownAttention as exc:
            raise _unknown(config, exc, prefix + ("exclude", i)) from None


def _check_entries(config: Config, prefix: KeyPath, entries: "list[AttentionEntry]") -> None:
    seen: dict = {}
    for i, entry in enumerate(entries):
        where = prefix + ("attentions", i)
        try:
            spec = registry.get_spec(entry.name)
        except registry.UnknownAttention as exc:
            raise _unknown(config, exc, where) from None
        for key, value in entry.hparams.items():
            try:
                registry.check_hparams(spec, {key: value})
            except registry.UnknownHyperparameter as exc:
                raise config.error(str(exc), where + ("hparams", key)) from None
        identity = entry.display_label or entry.name
        if identity in seen:
            first = format_key(prefix + ("attentions", seen[identity]))
            raise config.error(f"attention {identity!r} is listed twice (also at {first}); give the entries "
                               "different hparams or labels", where)
        seen[identity] = i


def _check_names(config: Config) -> None:
    """Every named and excluded attention is registered, its hyper-parameters exist, labels are unique."""
    scopes: list = [((), config)] + [((name,), section) for name, section in config.sections().items()]
    for prefix, scope in scopes:
        _check_exclude(config, prefix, scope)
        if scope.attentions not in (None, "all"):
            _check_entries(config, prefix, scope.attentions)


def parse_config(data: Any, *, source: str = "<config>", lines: "dict | None" = None) -> Config:
    """Validate an already-parsed config mapping (schema only: no plugin loading, no registry lookups)."""
    try:
        config = config_model().model_validate(data)
    except RecursionError:
        raise ConfigError("values nested too deeply", source=source) from None
    except ValidationError as exc:
        raise _validation_error(exc, data, lines or {}, source) from None
    config._source, config._lines = source, dict(lines or {})
    return config


def load_config(path: "str | Path") -> Config:
    """Read, validate and resolve a grid file: schema, plugins (loaded here), attention names, hparams.

    Plugins that fail to import are kept in `config.plugin_errors` (and named in any resulting
    unknown-attention error) rather than raised, so that one broken plugin does not stop the rest."""
    path = Path(path)
    data, lines = _read_yaml(path)
    return _resolved(parse_config(data, source=str(path), lines=lines), path.resolve().parent)


def loads_config(text: str, *, source: str = "<string>", base: "str | Path | None" = None) -> Config:
    """`load_config` of YAML text; relative plugin paths are looked up in `base` (default: the working
    directory)."""
    data, lines = _parse_yaml(text, source)
    return _resolved(parse_config(data, source=source, lines=lines), Path(base) if base else Path.cwd())


def _check_bench_has_cells(config: Config) -> None:
    """A bench section whose only mode is decode over noncausal patterns would plan no cell: say why."""
    bench = config.bench
    if bench is None or set(bench.modes) != {"decode"}:
        return
    patterns = config.patterns_of(bench)
    if not any(p.causal for p in patterns):
        raise config.error(f"the bench grid is empty, because mode `decode` exists only for the causal patterns "
                           f"(CS, CC) and the bench's patterns are {', '.join(p.value for p in patterns)}: add CS "
                           "or CC to `patterns`, or another mode to `bench.modes`", ("bench", "modes"))


def _resolved(config: Config, base: Path) -> Config:
    """Load the config's plugins and check every name it uses against the registry."""
    _resolve_plugins(config, base)
    config._plugin_errors = registry.discover(config.plugins)
    _check_names(config)
    _check_bench_has_cells(config)
    return config


__all__ = [
    "AttentionEntry", "BenchSection", "CheckSection", "Config", "ConfigError", "DEFAULT_MAX_CELLS",
    "ExecutorSection", "OutputSection", "SECTIONS", "Section", "config_model", "format_key", "load_config",
    "loads_config", "parse_config", "register_section_model",
]
