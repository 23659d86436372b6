"""cab: a comprehensive benchmark for efficient attention across CAB's four attention patterns."""

from cab.attention.base import Attention, UnsupportedPattern
from cab.patterns import Pattern
from cab.registry import (
    DuplicateAttention,
    UnknownAttention,
    create_attention,
    get_spec,
    register_attention,
)
from cab.status import Status

__version__ = "0.1.0"

__all__ = [
    "Attention", "DuplicateAttention", "Pattern", "Status", "UnknownAttention", "UnsupportedPattern",
    "__version__", "create_attention", "get_spec", "register_attention",
]
