"""`run_conformance`: every check an attention faces for one pattern, each isolated, into one report.

Order: forward, shape_dtype (if either fails the rest are skipped), finite, backward, the causality checks
of the pattern (CS: causal_prefix, causal_grad; CC: query_causal), key_padding, reference (when the
attention has a reference()), exact_oracle (exact attentions), decode (CS and CC, when the attention
decodes incrementally), segments (NS and CS, when the attention declares supports_segments), odd_shapes. A pattern the attention does not declare is one check,
`undeclared_pattern`: building must raise UnsupportedPattern naming both.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from cab.attention.base import UnsupportedPattern
from cab.check.agreement import check_exact_oracle, check_reference
from cab.check.basic import check_backward, check_finite, check_forward, check_shape_dtype
from cab.check.causality import check_causal_grad, check_causal_prefix, check_query_causal
from cab.check.decode import check_decode
from cab.check.isolation import isolated
from cab.check.outcomes import CheckOutcome, ConformanceReport
from cab.check.padding import check_key_padding
from cab.check.segments import check_segments
from cab.check.shapes import check_odd_shapes
from cab.check.subject import Subject, main_shape, parse_dtype
from cab.patterns import Pattern
from cab.registry import AttentionSpec, check_hparams, create_attention, get_spec
from cab.status import Status
from cab.devices import device_unavailable

Check = Callable[[Subject], CheckOutcome]
GATES = ("forward", "shape_dtype")  # the checks every other one depends on


def declared_checks(spec: AttentionSpec, pattern: Pattern) -> "list[tuple[str, Check]]":
    """The (name, check) pairs that apply to `spec` on a declared `pattern`, in order."""
    checks: list[tuple[str, Check]] = [
        ("forward", check_forward), ("shape_dtype", check_shape_dtype), ("finite", check_finite),
        ("backward", check_backward),
    ]
    if pattern is Pattern.CS:
        checks += [("causal_prefix", check_causal_prefix), ("causal_grad", check_causal_grad)]
    if pattern is Pattern.CC:
        checks.append(("query_causal", check_query_causal))
    checks.append(("key_padding", check_key_padding))
    if spec.has_reference:
        checks.append(("reference", check_reference))
    if spec.exact:
        checks.append(("exact_oracle", check_exact_oracle))
    if pattern.causal and spec.cls.has_decode():
        checks.append(("decode", check_decode))
    if not pattern.cross and spec.cls.supports_segments:
        checks.append(("segments", check_segments))
    checks.append(("odd_shapes", check_odd_shapes))
    return checks



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


def _run_declared(subject: Subject) -> "list[CheckOutcome]":
    outcomes: list[CheckOutcome] = []
    failed_gate = None
    for name, check in declared_checks(subject.spec, subject.pattern):
        if failed_gate:
            outcomes.append(CheckOutcome(name, Status.SKIPPED, message=f"skipped: {failed_gate} failed"))
            continue
        outcome = isolated(name, lambda c=check: c(subject))
        outcomes.append(outcome)
        if name in GATES and outcome.status is not Status.OK:
            failed_gate = name
    return outcomes


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

    def report(checks: "list[CheckOutcome]") -> ConformanceReport:
        return ConformanceReport(spec.name, pattern, checks, hparams, device, dtype)

    available = availability(spec, device)
    if available.status is not Status.OK:
        return report([available])
    with torch.random.fork_rng(devices=_rng_devices(device)), single_thread():
        if pattern not in spec.patterns:
            return report([isolated("undeclared_pattern", lambda: check_undeclared(spec, pattern, hparams, seed))])
        return report(_run_declared(Subject(spec, pattern, hparams, device, torch_dtype, seed)))
