"""NaN-poisoning of uninitialised memory: every floating `torch.empty*` allocation made while the mode is
active is filled with NaN, so an output that reads memory it never wrote is non-finite instead of
silently holding whatever the allocator returned."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_EMPTY_OPS = frozenset({
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.empty_strided.default,
    aten.new_empty_strided.default,
})


class PoisonEmpty(TorchDispatchMode):
    """Fill the result of every floating or complex torch.empty* call with NaN.

    Only allocations seen at the dispatcher's Python layer are poisoned (calls from Python, and from
    autograd formulas); buffers allocated inside one aten kernel are that kernel's own business."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in _EMPTY_OPS and (result.is_floating_point() or result.is_complex()):
            result.fill_(float("nan"))
        return result
