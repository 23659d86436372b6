"""`large_logits`: outputs and gradients stay finite when the scores are large, in the requested dtype, and an
exact attention still agrees with the float64 oracle there.

q and k of the main shape are scaled so that the largest |q.k| / sqrt(D) over all pairs is LOGIT (past
float32's exp overflow at 88.7 and underflow at -103, so a softmax without max subtraction, or a feature map
exponentiating raw scores, fails). An attention whose math cannot take such scores declares the largest it
takes as the class attribute `max_logit`; it is then probed at that bound instead, and the outcome says so.
"""

from __future__ import annotations

import math

import torch

from cab.check.agreement import oracle_agreement_on
from cab.check.basic import nonfinite_summary
from cab.check.gradients import vjp
from cab.check.outcomes import CheckOutcome
from cab.check.subject import Subject, dtype_name
from cab.status import Status

LOGIT = 200.0


def scaled_inputs(subject: Subject, dtype: torch.dtype, target: float, salt: str,
                  ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Main-shape inputs with q and k scaled (equally) so that max |q.k| / sqrt(D) is `target`."""
    shape = subject.main
    q, k, v = subject.inputs(shape, torch.float64, salt)
    group = shape.heads // shape.kv_heads
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(shape.head_dim)
    factor = math.sqrt(target / float(scores.abs().max()))
    return (q * factor).to(dtype), (k * factor).to(dtype), v.to(dtype)


def check_large_logits(subject: Subject) -> CheckOutcome:
    """Finite outputs and gradients at |logit| = LOGIT (or the declared max_logit); exact attentions agree
    with the oracle there."""
    dtype = subject.dtype
    declared = getattr(subject.spec.cls, "max_logit", None)
    target = LOGIT if declared is None else min(LOGIT, float(declared))
    bound = "" if declared is None else f" (the attention declares max_logit = {declared:g})"
    q, k, v = scaled_inputs(subject, dtype, target, "large_logits")
    module = subject.module_for(subject.main, dtype)
    leaves = {n: t.detach().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    out = subject.run(module, leaves["q"], leaves["k"], leaves["v"])
    tensors = {"output": out}
    if out.requires_grad:
        cotangent = subject.randn(tuple(out.shape), dtype, "large_logits:dout")
        tensors.update({f"d{n}": g for n, g in vjp(out, leaves, cotangent).items() if g is not None})
    fraction, where = nonfinite_summary(tensors)
    context = f"max |logit| {target:g}{bound}, {dtype_name(dtype)}"
    if fraction:
        return CheckOutcome("large_logits", Status.INCORRECT, fraction, 0.0, f"non-finite values at {context} "
                            f"({where})", "fraction")
    if subject.spec.exact:
        agreement = oracle_agreement_on(subject, q.detach(), k.detach(), v.detach(), "large_logits", target)
        return CheckOutcome("large_logits", agreement.status, agreement.error, agreement.tolerance,
                            f"finite at {context}; {agreement.message}", agreement.kind)
    return CheckOutcome("large_logits", Status.OK, 0.0, 0.0, f"outputs and gradients finite at {context}",
                        "fraction")
