"""The attention registry: `register_attention`, lookup with near-match suggestions, and plugin discovery.

Plugins are found only where the user put them: the entry-point group `cab.attentions` (packages the
user installed) and `--plugin FILE_OR_MODULE`. A plugin that fails to import becomes a `PluginError`
(with its traceback) and does not stop the other attentions; what it registered before it failed is
unregistered again.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cab.attention.base import Attention, UnsupportedPattern
from cab.patterns import Pattern
from cab.registries import DuplicateName, Registry, UnknownName, import_file

ENTRY_POINT_GROUP = "cab.attentions"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class UnknownAttention(UnknownName):
    """An attention name that is not registered; the message suggests near matches."""

    def __init__(self, name: str, known: "list[str]"):
        super().__init__("attention", name, known, hint=f"`cab list` shows the {len(known)} registered")


class DuplicateAttention(DuplicateName):
    """Two sources registered the same attention name."""


class UnknownHyperparameter(ValueError):
    """A hyper-parameter the attention's constructor does not take."""


@dataclass(frozen=True)
class AttentionSpec:
    """Metadata of one registered attention, kept beside its class."""

    name: str
    cls: type
    patterns: tuple[Pattern, ...]
    family: str
    exact: bool
    citation: str
    source: str
    supports_gqa: bool = True
    mechanism: str = ""
    hparams: dict = field(default_factory=dict)  # constructor keyword -> default
    accepts_any_hparam: bool = False
    description: str = ""
    unsupported_reasons: dict = field(default_factory=dict)
    version: int = 1  # raised whenever a change alters what the attention computes; enters cell keys

    @property
    def has_reference(self) -> bool:
        return self.cls.has_reference()

    def unavailable_reason(self, device: str) -> "str | None":
        return self.cls.unavailable_reason(device)

    def to_dict(self) -> dict:
        """JSON-ready metadata (what `cab list --json` prints)."""
        return {
            "name": self.name,
            "version": self.version,
            "family": self.family,
            "exact": self.exact,
            "patterns": [p.value for p in self.patterns],
            "unsupported": {p.value: r for p, r in self.unsupported_reasons.items()},
            "citation": self.citation,
            "mechanism": self.mechanism,
            "gqa": self.supports_gqa,
            "has_reference": self.has_reference,
            "segments": bool(getattr(self.cls, "supports_segments", False)),
            "hparams": {k: _jsonable(v) for k, v in self.hparams.items()},
            "description": self.description,
            "source": self.source,
        }


@dataclass(frozen=True)
class PluginError:
    """A plugin that could not be loaded: where it came from, the error and the traceback."""

    source: str
    message: str
    traceback: str


def _load_builtins() -> None:
    from cab.attention import load_builtin_attentions

    load_builtin_attentions()


_ATTENTIONS: "Registry[AttentionSpec]" = Registry("attention", loader=_load_builtins, unknown=UnknownAttention,
                                                  duplicate=DuplicateAttention)
_current_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("cab_plugin_source", default=None)
_entry_points_loaded = False
_loaded_plugins: dict[str, "list[PluginError]"] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _constructor_hparams(cls: type) -> "tuple[dict, bool]":
    """Hyper-parameters (keyword -> default) of cls.__init__ after (pattern, num_heads, head_dim)."""
    sig = inspect.signature(cls.__init__)
    params = list(sig.parameters.values())[1:]  # drop self
    fixed = {"pattern", "num_heads", "head_dim"}
    hparams, any_kw = {}, False
    for p in params:
        if p.name in fixed:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            any_kw = True
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            hparams[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return hparams, any_kw


def register_attention(
    name: str,
    *,
    patterns: "tuple | list | str" = ("NS", "CS", "NC", "CC"),
    family: str,
    exact: bool,
    citation: str = "",
    gqa: bool = True,
    mechanism: str = "",
    unsupported: "dict | None" = None,
    description: str = "",
    version: int = 1,
) -> Callable[[type], type]:
    """Class decorator registering a `cab.Attention` subclass under `name` with its metadata.

    `unsupported` maps undeclared patterns to the reason they are not supported (shown to users).
    `version` is raised whenever a change alters what the attention computes (its outputs, gradients or
    costs): stored results and cached verdicts of another version are then stale and run again.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"attention name {name!r} must start with a letter or digit and use [A-Za-z0-9_.-]")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"attention {name!r}: version must be a positive integer, got {version!r}")
    declared = Pattern.parse_many(patterns)
    reasons = {Pattern.parse(p): str(r) for p, r in (unsupported or {}).items()}

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"@register_attention({name!r}) must decorate a subclass of cab.Attention, got {cls!r}")
        source = _current_source.get() or f"module {cls.__module__}"
        hparams, any_kw = _constructor_hparams(cls)
        doc = inspect.getdoc(cls) or ""
        cls.name, cls.family, cls.patterns, cls.exact = name, family, declared, bool(exact)
        cls.citation, cls.supports_gqa, cls.mechanism = citation, bool(gqa), mechanism
        cls.unsupported_reasons, cls.version = reasons, version
        spec = AttentionSpec(
            name=name, cls=cls, patterns=declared, family=family, exact=bool(exact), citation=citation,
            source=source, supports_gqa=bool(gqa), mechanism=mechanism, hparams=hparams,
            accepts_any_hparam=any_kw, description=description or doc.split("\n\n")[0].replace("\n", " "),
            unsupported_reasons=reasons, version=version,
        )
        _ATTENTIONS.add(name, spec, f"{source} (class {cls.__module__}.{cls.__qualname__})")
        return cls

    return decorate


def unregister_attention(name: str) -> None:
    """Remove an attention (tests and interactive sessions)."""
    _ATTENTIONS.remove(name)


@contextlib.contextmanager
def _source(label: str) -> Iterator[None]:
    token = _current_source.set(label)
    try:
        yield
    finally:
        _current_source.reset(token)


def _forget_since(before: "set[str]") -> None:
    """Unregister what a plugin that failed half-way registered: it must not run half-loaded."""
    for name in set(_ATTENTIONS.names()) - before:
        _ATTENTIONS.remove(name)


def load_entry_points() -> "list[PluginError]":
    """Import every installed plugin of the `cab.attentions` entry-point group (once per process)."""
    global _entry_points_loaded
    _ATTENTIONS.load()
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    errors = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        label = f"entry point {ep.name!r} = {ep.value}" + (f" (package {dist.name} {dist.version})" if dist else "")
        with _source(label):
            before = set(_ATTENTIONS.names())
            try:
                ep.load()
            except (Exception, SystemExit) as exc:  # a broken plugin must not stop the others
                _forget_since(before)
                errors.append(PluginError(label, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    return errors


def load_plugin(spec: str) -> "list[PluginError]":
    """Import a plugin named on the command line: a .py file path or an importable module name."""
    _ATTENTIONS.load()
    path = Path(spec)
    is_file = spec.endswith(".py") or path.exists()
    if is_file:
        spec = str(path.resolve())  # one module per file, however the path is spelled
    if spec in _loaded_plugins:
        return _loaded_plugins[spec]
    label = f"plugin file {path.resolve()}" if is_file else f"plugin module {spec}"
    errors: list[PluginError] = []
    before = set(_ATTENTIONS.names())
    with _source(label):
        try:
            if is_file:
                if not path.is_file():
                    raise FileNotFoundError(f"no such plugin file: {spec}")
                if path.suffix != ".py":
                    raise ImportError(f"{spec} is not a Python file (plugin files end in .py)")
                digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
                stem = re.sub(r"\W", "_", path.stem)
                import_file(f"cab_plugin_{stem}_{digest}", path)
            else:
                importlib.import_module(spec)
        except (Exception, SystemExit) as exc:  # a plugin that exits on import is a broken plugin
            errors.append(PluginError(label, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            _forget_since(before)
    _loaded_plugins[spec] = errors
    return errors


def discover(plugins: "list[str] | tuple[str, ...]" = ()) -> "list[PluginError]":
    """Load built-ins, installed entry points and the named plugins; return what failed to load."""
    errors = load_entry_points()
    for spec in plugins:
        errors += load_plugin(spec)
    return errors


def loaded_plugin_specs() -> "list[str]":
    """The --plugin specs loaded in this process (passed on to isolated worker processes)."""
    return list(_loaded_plugins)


def names() -> "list[str]":
    """Every registered attention name, sorted."""
    return _ATTENTIONS.names()


def all_specs() -> "list[AttentionSpec]":
    """Every registered attention's spec, in name order."""
    return [spec for _, spec in _ATTENTIONS.items()]


def get_spec(name: str) -> AttentionSpec:
    """The spec registered under `name`; raises UnknownAttention with near-match suggestions."""
    return _ATTENTIONS.get(name)


def compile_lane(attention: str, hparams: "dict | None" = None) -> "str | None":
    """"compile:<attention>" when the attention built with `hparams` compiles a kernel per input shape
    (`Attention.compiles_kernels`), else None; an unknown name gets None (its cell reports it). The pool
    executor runs the cells of one such lane one at a time on one worker, so each reuses the kernels the
    previous one compiled instead of two workers compiling the same kernels at once."""
    try:
        spec = get_spec(attention)
    except UnknownAttention:
        return None
    return f"compile:{attention}" if spec.cls.compiles_kernels(hparams or {}) else None


def versions_of(attention: str, hparams: "dict | None" = None, **others: int) -> "dict[str, int]":
    """A cell's `versions`: the attention's registered version, the version of every attention a
    hyper-parameter names (delta's `base`, given or by default) under `hparam:<name>`, and `others` (a
    task cell's task and base attention)."""
    spec = get_spec(attention)
    versions = {"attention": spec.version}
    registered = set(_ATTENTIONS.names())
    for key, value in {**spec.hparams, **(hparams or {})}.items():
        if isinstance(value, str) and value in registered:
            versions[f"hparam:{key}"] = get_spec(value).version
    return {**versions, **others}


def check_hparams(spec: AttentionSpec, hparams: dict) -> None:
    """Raise UnknownHyperparameter for keywords the attention's constructor does not take."""
    if spec.accepts_any_hparam:
        return
    for key in hparams:
        if key not in spec.hparams:
            near = difflib.get_close_matches(key, list(spec.hparams), n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            known = ", ".join(spec.hparams) or "none"
            raise UnknownHyperparameter(
                f"attention {spec.name!r} has no hyper-parameter {key!r}{hint} (it takes: {known})"
            )


def create_attention(
    name: str, pattern: "Pattern | str", num_heads: int, head_dim: int, **hparams: Any
) -> Attention:
    """Build a registered attention for a pattern; raises UnsupportedPattern if it is not declared."""
    spec = get_spec(name)
    check_hparams(spec, hparams)
    return spec.cls(Pattern.parse(pattern), num_heads, head_dim, **hparams)


__all__ = [
    "AttentionSpec", "DuplicateAttention", "PluginError", "UnknownAttention", "UnknownHyperparameter",
    "UnsupportedPattern", "all_specs", "check_hparams", "compile_lane", "create_attention", "discover", "get_spec",
    "load_entry_points", "load_plugin", "loaded_plugin_specs", "names", "register_attention",
    "unregister_attention", "versions_of",
]
