"""The shape probe: the checks that matter at one concrete configuration (shape, dtype, device, backend),
cheap enough to run at every shape a benchmark or a task publishes, and at the fixed suite's large shapes.

At that shape, in that dtype, with the module the cell would build (same hparams, so the same backend):
- `finite`: the output has the right shape and dtype and is finite;
- `gradient` (CS, CC): no gradient from a row to a later row, at one row (just past 512 when the length
  allows, else a sampled one);
- `oracle` (exact attentions): sampled query rows, at the full key length, and the gradients of q, k, v
  through them agree with the float64 oracle within twice plain eager attention's error in the dtype (part
  `oracle_rows`: the rows' outputs only);
- `causality` (CS, CC): rows up to two split points (the one before the last row, and one just past 512 when
  the length allows, else a sampled one) unchanged when the rows after the split are perturbed (q, k, v for
  CS; q for CC), each row measured against its own scale;
- `batch`: perturbing every batch element but the first leaves the first one's output unchanged;
- `padding`: a right-padded element matches the element alone; real rows do not move when left- and
  interior-padded positions hold other garbage.

Variants of the input run stacked along the batch, so the probe costs few calls: one forward and backward
serves finite, gradient and oracle (one copy for the gradient row, one for the oracle rows), one forward without
autograd the causality copies (one per split), one masked forward the padding copies, and the right-padded
elements run alone once each. Each part is isolated; the outcome names every failing part and the seconds the
probe took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cab.check.agreement import held_to_oracle, output_and_grads
from cab.check.basic import nonfinite_summary, shape_problem
from cab.check.causality import perturbation_findings, perturbed_copies
from cab.check.compare import max_abs, relative_error, structural_tolerance
from cab.check.gradients import vjp
from cab.check.isolation import isolated
from cab.check.oracle import eager_attention_rows, oracle_attention_rows
from cab.check.outcomes import CheckOutcome, Finding, judged, measured
from cab.check.padding import alone_errors, garbage_finding, garbage_pair, left_and_interior, right_padded
from cab.check.subject import Shape, Subject, dtype_name, sample_splits
from cab.status import Status

CAUSAL_SPLITS = 2
ORACLE_ROWS = 6
ALL_PARTS = frozenset({"finite", "gradient", "oracle", "causality", "batch", "padding", "right_padding"})
# "oracle_rows" instead of "oracle": the sampled rows' outputs only, from the plain forward (no backward)


@dataclass
class _Pass:
    """What the forward-and-backward pass found: the output, gradient-leak findings, oracle outcome."""

    output: "torch.Tensor | None" = None
    leaks: "list[Finding]" = field(default_factory=list)
    oracle: "CheckOutcome | None" = None
    no_gradient: bool = False
    causal: "list[Finding]" = field(default_factory=list)


def _finite(out: torch.Tensor, shape: Shape, dtype: torch.dtype) -> CheckOutcome:
    problem = shape_problem(out, shape, dtype)
    if problem:
        return CheckOutcome("finite", Status.INCORRECT, message=problem)
    fraction, where = nonfinite_summary({"output": out})
    if fraction:
        return CheckOutcome("finite", Status.INCORRECT, fraction, 0.0, f"non-finite outputs ({where})", "fraction")
    return CheckOutcome("finite", Status.OK, 0.0, 0.0, "finite", "fraction")


def _forward_backward(subject: Subject, module, q, k, v, shape: Shape, dtype: torch.dtype, salt: str,
                      leak_rows: "list[int]", oracle_rows: "list[int]", splits: "list[int]") -> _Pass:
    """One stacked call: a copy of the inputs per gradient row (cotangent on that row alone) and one for the
    oracle rows (cotangent on those rows), then one backward; the causality copies (perturbed after each
    split) in one call without autograd (in the graph, a backward would run through them too). Without
    gradient rows or oracle rows, one plain forward of the inputs and the causality copies."""
    found = _Pass()
    copies = len(leak_rows) + (1 if oracle_rows else 0)
    perturbed = perturbed_copies(subject, q, k, v, splits, f"{salt}:causal")
    if not copies:
        with torch.no_grad():
            outs = subject.run_copies(module, [(q, k, v, None)] + perturbed)
        found.output = outs[0].detach().clone()
        if not shape_problem(found.output, shape, dtype):
            found.causal = perturbation_findings(subject, outs[1:], found.output, splits)
        return found
    leaves = [{n: t.detach().clone().requires_grad_() for n, t in zip("qkv", (q, k, v))} for _ in range(copies)]
    outs = subject.run_copies(module, [(leaf["q"], leaf["k"], leaf["v"], None) for leaf in leaves])
    found.output = outs[0].detach().clone()
    if shape_problem(found.output, shape, dtype):
        return found
    if perturbed:
        with torch.no_grad():
            found.causal = perturbation_findings(subject, subject.run_copies(module, perturbed), found.output, splits)
    if nonfinite_summary({"o": found.output})[0]:
        return found
    if not outs[0].requires_grad:
        found.no_gradient = True
        return found
    dout = subject.randn(tuple(outs[0].shape), dtype, f"{salt}:dout")
    cotangents = []
    for row in leak_rows:
        cotangent = torch.zeros_like(dout)
        cotangent[..., row, :] = dout[..., row, :]
        cotangents.append(cotangent)
    if oracle_rows:
        cotangent = torch.zeros_like(dout)
        cotangent[..., oracle_rows, :] = dout[..., oracle_rows, :]
        cotangents.append(cotangent)
    flat = {f"{c}:{n}": leaf[n] for c, leaf in enumerate(leaves) for n in "qkv"}
    grads = vjp(torch.cat(outs), flat, torch.cat(cotangents))  # the perturbed copies get no cotangent
    inputs = "qkv" if subject.pattern.value == "CS" else "q"
    for c, row in enumerate(leak_rows):
        present = {n: grads[f"{c}:{n}"] for n in inputs if grads[f"{c}:{n}"] is not None}
        own = max((max_abs(g[..., : row + 1, :]) for g in present.values()), default=0.0)
        for name, g in present.items():
            leak = max_abs(g[..., row + 1:, :])
            error = leak / own if own > 0 else (0.0 if leak == 0 else float("inf"))
            found.leaks.append((error, f"d out[{row}] / d {name}[{row + 1}:] vs d out[{row}] / d {name}[:{row + 1}]"))
    if oracle_rows:
        c = len(leak_rows)
        got = {"output": found.output[..., oracle_rows, :],
               **{f"d{n}": grads[f"{c}:{n}"] for n in "qkv"}}
        pattern, rows_dout = subject.pattern, dout[..., oracle_rows, :]
        oracle = output_and_grads(lambda *a: oracle_attention_rows(*a, pattern, oracle_rows), q, k, v, rows_dout,
                                  torch.float64)
        eager = output_and_grads(lambda *a: eager_attention_rows(*a, pattern, oracle_rows), q, k, v, rows_dout, dtype)
        found.oracle = held_to_oracle("oracle", got, oracle, eager, dtype,
                                      where=f" (rows {oracle_rows} at the full key length, and their gradients)")
    return found


def _oracle_outputs(subject: Subject, q, k, v, full: torch.Tensor, rows: "list[int]", dtype: torch.dtype,
                    ) -> CheckOutcome:
    """Sampled rows of the output (no gradients) vs the float64 oracle at the full key length."""
    with torch.no_grad():
        expected = oracle_attention_rows(q, k, v, subject.pattern, rows)
        eager = eager_attention_rows(q, k, v, subject.pattern, rows)
    return held_to_oracle("oracle", {"output": full[..., rows, :]}, {"output": expected}, {"output": eager}, dtype,
                          where=f" (rows {rows} at the full key length)")


def _batch(subject: Subject, module, q, k, v, full: torch.Tensor, dtype: torch.dtype, salt: str) -> CheckOutcome:
    others = [subject.randn(tuple(t.shape), dtype, f"{salt}:batch:{n}") for n, t in zip("qkv", (q, k, v))]
    moved = [torch.cat([t[:1], o[1:]]) for t, o in zip((q, k, v), others)]
    with torch.no_grad():
        changed = subject.run(module, *moved)
    return measured("batch", relative_error(changed[:1], full[:1]), structural_tolerance(dtype),
                    "batch element 0 with every other element perturbed")


def _padding(subject: Subject, module, shape: Shape, dtype: torch.dtype, salt: str, right: bool) -> CheckOutcome:
    """The right-padded copy and the garbage pair in one masked call, then each right-padded element alone."""
    pads = tuple(max(1, shape.lk // (3 + 2 * b)) for b in range(shape.batch))
    inner = left_and_interior(shape, subject.device)
    copies = garbage_pair(subject, shape, dtype, inner, f"{salt}:inner")
    if right:
        copies.append(right_padded(subject, shape, dtype, f"{salt}:right", pads))
    with torch.no_grad():
        outs = subject.run_copies(module, copies)
        found = [garbage_finding(subject, shape, inner, outs[0], outs[1], "left and interior padded positions")]
        if right:
            found += alone_errors(subject, module, shape, copies[2], outs[2], pads)
    return judged("padding", found, structural_tolerance(dtype), dtype_name(dtype))


def gradient_row(length: int) -> "list[int]":
    """The one row whose gradient the probe checks for leaks: just past 512 when the length allows (a second
    tile, most later rows), else one sampled away from the last row (which has a single later row)."""
    rows = sample_splits(length, 2, salt=1)
    return [r for r in rows if r != length - 2][:1] or rows[:1]


def probe_shape(subject: Subject, shape: Shape, dtype: "torch.dtype | None" = None, name: str = "",
                salt: str = "probe", parts: "frozenset[str]" = ALL_PARTS) -> CheckOutcome:
    """The probe's `parts` (default all; see the module docstring) on `shape` in `dtype` (the requested one by
    default), as one outcome named `name` (default: the shape's label) whose message lists each part."""
    dtype = dtype or subject.dtype
    name = name or shape.label
    start = time.perf_counter()
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(shape, dtype, f"{salt}:{shape.label}")
    causal = subject.pattern.causal
    leak_rows = gradient_row(shape.lq) if causal and "gradient" in parts else []
    oracle_rows, output_rows = [], []
    if subject.spec.exact and ("oracle" in parts or "oracle_rows" in parts):
        rows = sorted(set(sample_splits(shape.lq + 1, ORACLE_ROWS, salt=2) + [0]))
        oracle_rows, output_rows = (rows, []) if "oracle" in parts else ([], rows)
    splits = sample_splits(shape.lq, CAUSAL_SPLITS) if causal and "causality" in parts else []
    passed: list[_Pass] = []

    def forward() -> CheckOutcome:
        passed.append(_forward_backward(subject, module, q, k, v, shape, dtype, salt, leak_rows, oracle_rows,
                                        splits))
        return _finite(passed[0].output, shape, dtype)

    results = [isolated("finite", forward)]
    if results[0].status is Status.OK:
        found = passed[0]
        if leak_rows:
            results.append(judged("gradient", found.leaks, structural_tolerance(dtype), f"rows {leak_rows}")
                           if found.leaks else
                           CheckOutcome("gradient", Status.OK, message="the output has no gradient (see backward)"))
        if found.oracle is not None:
            results.append(found.oracle)
        if output_rows:
            results.append(isolated("oracle", lambda: _oracle_outputs(subject, q, k, v, found.output, output_rows,
                                                                      dtype)))
        elif oracle_rows and found.no_gradient:
            results.append(CheckOutcome("oracle", Status.INCORRECT, message="no gradient reaches q, k or v"))
        if splits:
            results.append(judged("causality", found.causal, structural_tolerance(dtype), f"splits {splits}"))
        if shape.batch >= 2 and "batch" in parts:
            results.append(isolated("batch", lambda: _batch(subject, module, q, k, v, found.output, dtype, salt)))
        if "padding" in parts:
            results.append(isolated("padding", lambda: _padding(subject, module, shape, dtype, salt,
                                                                "right_padding" in parts)))
    seconds = time.perf_counter() - start
    where = f"{shape.describe()} {dtype_name(dtype)}, backend {getattr(module, 'backend', 'torch')}"
    status = Status.worst([p.status for p in results])
    if status is Status.OK:
        return CheckOutcome(name, Status.OK, message=f"{where}: {', '.join(p.name for p in results)} ok "
                                                     f"({seconds:.2f} s)")
    failing = [p for p in results if p.status is not Status.OK]
    decisive = next(p for p in failing if p.status is status)
    detail = "; ".join(f"{p.name}: {p.message}" for p in failing)
    return CheckOutcome(name, status, decisive.error, decisive.tolerance, f"{where}: {detail} ({seconds:.2f} s)",
                        decisive.kind)


def probe_decode(subject: Subject, shape: Shape, dtype: "torch.dtype | None" = None, name: str = "published",
                 salt: str = "probe") -> CheckOutcome:
    """The probe of one incremental decoding step at a published context (shape.lk keys): the step's output is
    finite and equals forward() of that one query against the same keys (CS: the context plus the step's own
    token; CC: the memory)."""
    dtype = dtype or subject.dtype
    start = time.perf_counter()
    module = subject.module_for(shape, dtype)
    q, k, v = subject.inputs(Shape(shape.batch, shape.heads, shape.kv_heads, 1, shape.lk, shape.head_dim),
                             dtype, f"{salt}:decode")
    causal_self = subject.pattern.value == "CS"
    context = shape.lk - 1 if causal_self else shape.lk
    module.eval()
    try:
        with torch.no_grad():
            subject.reseed()
            state = module.decode_init(k[..., :context, :].contiguous(), v[..., :context, :].contiguous(),
                                       capacity=shape.lk)
            if causal_self:
                step, _ = module.decode_step(state, q, k[..., context:, :].contiguous(),
                                             v[..., context:, :].contiguous())
            else:
                step, _ = module.decode_step(state, q)
            expected = subject.run(module, q, k, v)
    finally:
        module.train()
    seconds = time.perf_counter() - start
    where = f"one decoding step at context {shape.lk} ({shape.describe()}) in {dtype_name(dtype)}"
    fraction, bad = nonfinite_summary({"step": step})
    if fraction:
        return CheckOutcome(name, Status.INCORRECT, fraction, 0.0, f"{where}: non-finite outputs ({bad})", "fraction")
    return measured(name, relative_error(step, expected), structural_tolerance(dtype),
                    f"{where} vs forward() of that query ({seconds:.2f} s)")
