"""`run_conformance`: every check an attention faces for one pattern, each isolated, into one report.

Order: forward, shape_dtype (if either fails the rest are skipped); finite, backward; determinism and
independence (what every later check relies on, so an attention breaking them is named for it); the
causality checks of the pattern (CS: causal_prefix, causal_grad; CC: query_causal); key_padding; gradients
(finite differences); reference (when the attention has a reference()); exact_oracle (exact attentions);
large_logits; decode (CS and CC, when the attention decodes incrementally); segments (NS and CS, when the
attention declares supports_segments); odd_shapes; large_shapes. The checks that compare a computation with
itself run in the structural dtype (float64 when the attention runs in it) and again in the requested dtype,
the second outcome named `<check>[<dtype>]`. A pattern the attention does not declare is one check,
`undeclared_pattern`: building must raise UnsupportedPattern naming both.

The report's `coverage` says what the verdict covers: the shapes, the dtypes (and the fallback from float64,
if any), the backend each dtype ran, the checks that could not run and why, and the seconds it took.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from cab.attention.base import UnsupportedPattern
from cab.check.agreement import check_exact_oracle, check_reference
from cab.check.basic import check_backward, check_finite, check_forward, check_shape_dtype
from cab.check.causality import check_causal_grad, check_causal_prefix, check_query_causal
from cab.check.decode import check_decode
from cab.check.gradvalues import check_gradients
from cab.check.independence import check_determinism, check_independence
from cab.check.isolation import isolated
from cab.check.logits import check_large_logits
from cab.check.outcomes import CheckOutcome, ConformanceReport
from cab.check.padding import check_key_padding
from cab.check.probe import probe_decode, probe_shape
from cab.check.segments import check_segments
from cab.check.shapes import check_large_shapes, check_odd_shapes, odd_shapes
from cab.check.subject import Shape, Subject, dtype_name, large_shapes, main_shape, parse_dtype
from cab.devices import device_unavailable
from cab.patterns import Pattern
from cab.registry import AttentionSpec, check_hparams, create_attention, get_spec
from cab.status import Status

Check = Callable[..., CheckOutcome]
GATES = ("forward", "shape_dtype")  # the checks every other one depends on
# checks that run in the structural dtype and again in the requested one (check(subject, dtype))
PER_DTYPE = frozenset({"independence", "causal_prefix", "causal_grad", "query_causal", "key_padding", "reference",
                       "decode", "segments"})


def declared_checks(spec: AttentionSpec, pattern: Pattern) -> "list[tuple[str, Check]]":
    """The (name, check) pairs that apply to `spec` on a declared `pattern`, in order."""
    checks: list[tuple[str, Check]] = [
        ("forward", check_forward), ("shape_dtype", check_shape_dtype), ("finite", check_finite),
        ("backward", check_backward), ("determinism", check_determinism), ("independence", check_independence),
    ]
    if pattern is Pattern.CS:
        checks += [("causal_prefix", check_causal_prefix), ("causal_grad", check_causal_grad)]
    if pattern is Pattern.CC:
        checks.append(("query_causal", check_query_causal))
    checks += [("key_padding", check_key_padding), ("gradients", check_gradients)]
    if spec.has_reference:
        checks.append(("reference", check_reference))
    if spec.exact:
        checks.append(("exact_oracle", check_exact_oracle))
    checks.append(("large_logits", check_large_logits))
    if pattern.causal and spec.cls.has_decode():
        checks.append(("decode", check_decode))
    if not pattern.cross and spec.cls.supports_segments:
        checks.append(("segments", check_segments))
    checks += [("odd_shapes", check_odd_shapes), ("large_shapes", check_large_shapes)]
    return checks


def not_run(spec: AttentionSpec, pattern: Pattern) -> "dict[str, str]":
    """The optional checks that do not apply to `spec` on `pattern`, and why (shown with the verdict)."""
    reasons = {}
    if not spec.has_reference:
        reasons["reference"] = "the attention has no reference()"
    if not spec.exact:
        reasons["exact_oracle"] = "an approximate attention (exact=False): no oracle comparison"
    if pattern.causal and not spec.cls.has_decode():
        reasons["decode"] = "no incremental decoding (decode_step)"
    if not pattern.cross and not spec.cls.supports_segments:
        reasons["segments"] = "segment_ids not supported"
    if not spec.supports_gqa:
        reasons["gqa"] = "grouped-query heads not declared (gqa=False)"
    if getattr(spec.cls, "mixes_heads", False):
        reasons["head_independence"] = "heads mix by design (mixes_heads)"
    return reasons


def check_undeclared(spec: AttentionSpec, pattern: Pattern, hparams: dict, seed: int) -> CheckOutcome:
    """Building for an undeclared pattern must raise UnsupportedPattern naming the attention and pattern."""
    shape = main_shape(pattern)
    try:
        torch.manual_seed(seed)
        create_attention(spec.name, pattern, shape.heads, shape.head_dim, **hparams)
    except UnsupportedPattern as exc:
        text = " ".join(str(exc).split())
        if spec.name in text and (pattern.value in text or pattern.long_name in text):
            return CheckOutcome("undeclared_pattern", Status.UNSUPPORTED, message=text)
        return CheckOutcome("undeclared_pattern", Status.INCORRECT,
                            message=f"UnsupportedPattern does not name the attention and the pattern: {text}")
    return CheckOutcome("undeclared_pattern", Status.INCORRECT,
                        message=f"undeclared pattern accepted: building {spec.name!r} for {pattern.value} did not "
                                f"raise UnsupportedPattern (declared: {', '.join(p.value for p in spec.patterns)})")


def _renamed(outcome: CheckOutcome, name: str) -> CheckOutcome:
    return CheckOutcome(name, outcome.status, outcome.error, outcome.tolerance, outcome.message, outcome.kind)


def _run_declared(subject: Subject) -> "list[CheckOutcome]":
    outcomes: list[CheckOutcome] = []
    failed_gate = None
    for name, check in declared_checks(subject.spec, subject.pattern):
        if failed_gate:
            outcomes.append(CheckOutcome(name, Status.SKIPPED, message=f"skipped: {failed_gate} failed"))
            continue
        if name not in PER_DTYPE:
            outcome = isolated(name, lambda c=check: c(subject))
            outcomes.append(outcome)
            if name in GATES and outcome.status is not Status.OK:
                failed_gate = name
            continue
        for index, dtype in enumerate(subject.check_dtypes()):
            label = name if index == 0 else f"{name}[{dtype_name(dtype)}]"
            outcomes.append(_renamed(isolated(label, lambda c=check, d=dtype: c(subject, d)), label))
    return outcomes


def coverage(subject: Subject, shapes: "list[Shape]", seconds: float) -> dict:
    """What a report covers: shapes, dtypes (structural and requested, with any fallback), backends, the
    checks that could not run, seconds."""
    structural, note = subject.structural()
    return {
        "shapes": [f"{s.label}: {s.describe()}" for s in shapes],
        "dtypes": {"structural": dtype_name(structural), "requested": dtype_name(subject.dtype)},
        "structural_fallback": note,
        "backends": dict(subject.backends),
        "device": str(subject.device),
        "not_run": {**not_run(subject.spec, subject.pattern), **subject.not_run},
        "seconds": round(seconds, 3),
    }


def suite_shapes(spec: AttentionSpec, pattern: Pattern) -> "list[Shape]":
    """Every shape the fixed suite runs on for `pattern`."""
    return [main_shape(pattern)] + odd_shapes(pattern, spec.supports_gqa) + large_shapes(pattern, spec.supports_gqa)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op CPU thread while the checks run (restored after): their tensors are tiny, so threads
    only add synchronisation, which costs tens of times the work on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rng_devices(device: str) -> "list[int]":
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def availability(spec: AttentionSpec, device: str) -> CheckOutcome:
    """`available`: ok, or unsupported with the reason the device or the attention cannot run here (an
    exception from the attention's own unavailable_reason() is an error)."""
    def declared() -> CheckOutcome:
        reason = device_unavailable(device) or spec.unavailable_reason(device)
        return CheckOutcome("available", Status.UNSUPPORTED if reason else Status.OK, message=reason or "")

    return isolated("available", declared)


def run_conformance(attention: str, pattern: "Pattern | str", *, hparams: "dict | None" = None,
                    device: str = "cpu", dtype: str = "float32", seed: int = 0) -> ConformanceReport:
    """Run the conformance suite of `attention` on `pattern`; never raises for a failure of the attention
    (an unknown attention, pattern, dtype or hyper-parameter is the caller's error and does raise; so does
    the runner's CellTimeout). The caller's random state is left as it was."""
    spec = get_spec(attention)
    pattern = Pattern.parse(pattern)
    hparams = dict(hparams or {})
    check_hparams(spec, hparams)
    torch_dtype = parse_dtype(dtype)

    def report(checks: "list[CheckOutcome]", covered: "dict | None" = None) -> ConformanceReport:
        return ConformanceReport(spec.name, pattern, checks, hparams, device, dtype, covered or {})

    available = availability(spec, device)
    if available.status is not Status.OK:
        return report([available])
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)), single_thread():
        if pattern not in spec.patterns:
            return report([isolated("undeclared_pattern", lambda: check_undeclared(spec, pattern, hparams, seed))])
        subject = Subject(spec, pattern, hparams, device, torch_dtype, seed)
        checks = _run_declared(subject)
        return report(checks, coverage(subject, suite_shapes(spec, pattern), time.perf_counter() - start))


def run_probe(attention: str, pattern: "Pattern | str", shape: Shape, *, hparams: "dict | None" = None,
              device: str = "cpu", dtype: str = "float32", seed: int = 0, decode: bool = False) -> ConformanceReport:
    """The shape probe (cab.check.probe) of `attention` at one published configuration, as a report with one
    check, `published`, whose coverage names the shape, dtype and backend it ran (`decode`: the probe of one
    decoding step at context shape.lk instead)."""
    spec = get_spec(attention)
    pattern = Pattern.parse(pattern)
    hparams = dict(hparams or {})
    torch_dtype = parse_dtype(dtype)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        subject = Subject(spec, pattern, hparams, device, torch_dtype, seed)
        probe = probe_decode if decode else probe_shape
        outcome = isolated("published", lambda: probe(subject, shape, torch_dtype, "published", "published"))
    seconds = time.perf_counter() - start
    what = f"decode step at context {shape.lk}" if decode else shape.describe()
    covered = {"shapes": [f"published: {what} {dtype}"], "backends": dict(subject.backends),
               "probe_seconds": round(seconds, 3)}
    return ConformanceReport(spec.name, pattern, [outcome], hparams, device, dtype, covered)
