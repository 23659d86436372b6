"""Vector-Jacobian products that never accumulate into `.grad`, so the module under test can be reused."""

from __future__ import annotations

import torch
from torch import nn


def trainable_parameters(module: nn.Module) -> "dict[str, torch.Tensor]":
    """The module's parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def vjp(output: torch.Tensor, inputs: "dict[str, torch.Tensor]", cotangent: torch.Tensor,
        retain_graph: bool = False) -> "dict[str, torch.Tensor | None]":
    """d<output, cotangent>/d input for each named input; None where the output does not depend on it
    (including an output that is not differentiable at all)."""
    names = list(inputs)
    if not output.requires_grad:
        return {name: None for name in names}
    grads = torch.autograd.grad(output, [inputs[n] for n in names], cotangent, retain_graph=retain_graph,
                                allow_unused=True)
    return dict(zip(names, grads))
