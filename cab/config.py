"""Grid configuration: the YAML schema (pydantic, unknown keys refused), loading, and located errors.

Every problem in a config file becomes one `ConfigError` naming the file, the key path and, when known,
the line: ``configs/x.yaml, line 7, key bench.lengths[1]: expected a positive integer, got 'abc'``.
Sections (`check`, `bench`, later `tasks`) each describe one kind of cell; each may override the top-level
`attentions` / `exclude` / `patterns`.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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
    model_validator,
)

from cab import registry
from cab.cells import BENCH_MODES, DTYPES
from cab.executors import EXECUTORS
from cab.patterns import Pattern

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


def _integer(minimum: int, what: str):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected {what}, got {_got(value)}")
        return value
    return check


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number, got {_got(value)}")
    return float(value)


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
    """Timing cells: attention x pattern x length x mode x dtype."""

    lengths: LengthList
    kv_ratio: PositiveFloat = 1.0
    batch: PositiveInt = 1
    heads: PositiveInt = 4
    kv_heads: "PositiveInt | None" = None
    head_dim: PositiveInt = 64
    modes: ModeList = Field(default_factory=lambda: ["fwd", "fwdbwd"])
    dtypes: DTypeList = Field(default_factory=lambda: ["float32"])
    min_run_time_s: PositiveFloat = 0.5
    memory: bool = True

    @model_validator(mode="after")
    def _kv_heads_divide_heads(self) -> "BenchSection":
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        return self


class ExecutorSection(_Schema):
    """How cells run: in this process (`local`) or each in a fresh worker process (`subprocess`)."""

    kind: ExecutorKind = "local"
    timeout_s: "PositiveFloat | None" = 300.0


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
            raise ValueError("the config has no work: add a `check` and/or a `bench` section")
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
        return {name: section for name in SECTION_ORDER if (section := getattr(self, name)) is not None}

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


SECTION_ORDER = ("check", "bench")  # a `tasks` section slots in here


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


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict, source: str) -> None:
    """Record the 1-based line of every key and list item; refuse duplicate keys (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (first on line {seen[key]})", source=source,
                                  key=format_key(path + (key,)), line=key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), lines, source)


def _read_yaml(path: Path) -> "tuple[Any, dict]":
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("no such config file", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file ({exc})", source=source) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
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
    lines: dict = {}
    _index_lines(node, (), lines, source)
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
    model: "type[BaseModel] | None" = Config
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
            spec = str(found.resolve())
        resolved.append(spec)
    config.plugins = resolved


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
        config = Config.model_validate(data)
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
    config = parse_config(data, source=str(path), lines=lines)
    _resolve_plugins(config, path.resolve().parent)
    config._plugin_errors = registry.discover(config.plugins)
    _check_names(config)
    return config


__all__ = [
    "AttentionEntry", "BenchSection", "CheckSection", "Config", "ConfigError", "DEFAULT_MAX_CELLS",
    "ExecutorSection", "OutputSection", "SECTION_ORDER", "Section", "format_key", "load_config", "parse_config",
]
