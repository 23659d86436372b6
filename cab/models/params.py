"""Parameter counts of a model, split into the attentions under test and everything else, with CAB's
(and LRA's) rule: an attention adding more than 10% of the backbone's parameters is flagged."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

PARAMETER_LIMIT = 0.10


@dataclass(frozen=True)
class ParameterCount:
    """total = attention (the tested slots' own parameters) + backbone (everything else);
    overhead = attention / backbone; flagged when overhead > PARAMETER_LIMIT."""

    total: int
    attention: int
    backbone: int
    overhead: float
    flagged: bool

    def metrics(self) -> dict:
        """The counts as TaskMetrics fields: params_total, params_attention, params_backbone, param_overhead,
        param_flag."""
        names = {"total": "params_total", "attention": "params_attention", "backbone": "params_backbone",
                 "overhead": "param_overhead", "flagged": "param_flag"}
        return {names[k]: v for k, v in asdict(self).items()}


def count_parameters(model: nn.Module, limit: float = PARAMETER_LIMIT) -> ParameterCount:
    """Count trainable parameters; those inside modules marked `cab_tested` (by AttentionSlots) belong to
    the attention under test. A parameter shared between modules is counted once."""
    tested: set[int] = set()
    for module in model.modules():
        if getattr(module, "cab_tested", False):
            tested.update(id(p) for p in module.parameters() if p.requires_grad)
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    total = sum(seen.values())
    attention = sum(n for i, n in seen.items() if i in tested)
    backbone = total - attention
    overhead = attention / backbone if backbone else 0.0
    return ParameterCount(total, attention, backbone, overhead, overhead > limit)
