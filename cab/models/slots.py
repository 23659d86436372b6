"""Which attention fills each attention slot of a backbone: the attention under test in the slots of one
pattern, a base attention (exact by default) in every other slot, as CAB did per pattern."""

from __future__ import annotations

from dataclasses import dataclass, field

from cab.attention.base import Attention
from cab.patterns import Pattern
from cab.registry import create_attention

DEFAULT_BASE = "sdpa"


@dataclass(frozen=True)
class AttentionSlots:
    """Builds the attention of one slot from the registry, for the slot's pattern.

    Slots of `pattern` get `attention` built with `hparams`; the other slots get `base` with its defaults,
    so a backbone's other patterns stay exact and differences are attributable to the tested slots."""

    attention: str
    pattern: Pattern
    hparams: dict = field(default_factory=dict)
    base: str = DEFAULT_BASE

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))

    def is_tested(self, slot_pattern: "Pattern | str") -> bool:
        return Pattern.parse(slot_pattern) is self.pattern

    def build(self, slot_pattern: "Pattern | str", num_heads: int, head_dim: int) -> Attention:
        """The attention for a slot of `slot_pattern`, marked with `cab_tested` for parameter counting."""
        slot_pattern = Pattern.parse(slot_pattern)
        if self.is_tested(slot_pattern):
            module = create_attention(self.attention, slot_pattern, num_heads, head_dim, **self.hparams)
        else:
            module = create_attention(self.base, slot_pattern, num_heads, head_dim)
        module.cab_tested = self.is_tested(slot_pattern)
        return module
