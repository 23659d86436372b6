"""Built-in attentions: one mechanism module per registered attention. Every module in this package except the
helpers named in `_NOT_MECHANISMS` is imported on first use of the registry, so adding an attention touches one
file; packages (`engine/`, the shared computation every mechanism uses, and `kernels/`) are not mechanisms.

Module names. A module is named by the attention it registers (`emma.py` registers "emma"), with two rules:
- a module registering several variants of one mechanism is named by what they share: `exact` (vanilla, sdpa,
  memory_efficient), `flash` (flash, flex), `head_hetero` (aha, duo, moa, qada), `neighborhood` (neighborhood,
  gna), `public_kernels` (fla_chunk_linear, fla_fused_recurrent), `shifted_sparse` (s2_attn, sf_attn),
  `softmax_free` (relu_attention, sigmoid_attention, softplus_attention) and `softmax_reweighted`
  (selective_attention, cog_attention, affine_scaled_attention);
- a registered name that is also a standard-library module takes the suffix `_attention` (`abc_attention.py`
  registers "abc"), so no module shadows the standard library.
Registered names never change (results and configs refer to them); `cab list` maps names to classes.

Docstring markers. Where a mechanism departs from or goes beyond its paper, the docstring says why with a marker:
- [EJ] engineering judgement: the paper leaves the choice open (a default, a constant, a causal or cross variant
  it does not describe), and this is the choice made, with the reason;
- [BG] benchmark boundary: what of the paper the operator implements and what it replaces, where the paper's
  mechanism reaches beyond an attention operator (the layer input x, a trained decoder or router, other layers,
  an estimate the benchmark computes exactly); the operator works from q, k and v (or a seeded parameter).
"""

from __future__ import annotations

import importlib
import pkgutil

_NOT_MECHANISMS = {"base"}


def load_builtin_attentions() -> None:
    """Import every mechanism module of this package, which registers its attentions."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_MECHANISMS and not info.name.startswith("_") and not info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
