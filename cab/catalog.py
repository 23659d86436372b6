"""The coverage catalogue: every mechanism of the seed papers (../shared/design/MECHANISMS.md, ids M1-M65)
and which registered attention implements it, or why none does. `cab list --catalog` prints it.

Implementation is never written here: an attention claims a mechanism with `mechanism="M8"` (or
"M8,M9") in its `register_attention` call, so the catalogue cannot drift from the registry. An entry
that no attention claims must carry a reason in `NOT_IMPLEMENTED`, or it shows as missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cab import registry


@dataclass(frozen=True)
class Mechanism:
    """One catalogue row: seed id, title and the MECHANISMS.md section it comes from."""

    id: str
    title: str
    section: str


SECTIONS = {
    "1A": "exact / IO-aware and KV layout",
    "1B": "linear / kernel / low rank",
    "1C": "sparse / local / routing / retrieval",
    "1D": "softmax replacements and score variants",
    "1E": "cross-attention mechanisms",
}

_ROWS = """
M1|Vanilla softmax attention (reference)|1A
M2|FlashAttention / FlashAttention-2|1A
M3|Memory-efficient attention|1A
M4|Lean Attention (decode-phase split-KV)|1A
M5|Multi-query and grouped-query attention|1A
M6|MoH: mixture-of-head attention|1A
M7|Performer (FAVOR+)|1B
M8|Lightning Attention / TransNormerLLM|1B
M9|Lightning Attention-2 (tiled)|1B
M10|Flowformer (Flow-Attention)|1B
M11|Hedgehog|1B
M12|MALA: magnitude-aware linear attention|1B
M13|NaLaFormer: norm-aware linear attention|1B
M14|Linear Log-Normal attention|1B
M15|MirrorLA|1B
M16|InLine: injective linear attention|1B
M17|RALA: rank-augmented linear attention|1B
M18|L2ViT: linear global + local window|1B
M19|Kernelized attention with RPE via FFT|1B
M20|BASED: Taylor linear + sliding window|1B
M21|Agent Attention|1B
M22|LightNet: additive linear recurrence|1B
M23|ScatterFormer: scattered (segment-wise) linear attention|1B
M24|LinFusion: generalized normalized linear attention|1B
M25|LongVQ: codebook attention|1B
M26|Local Linear Attention (LLA)|1B
M27|DaViT channel attention|1B
M28|CARE linear branch|1B
M29|Sliding-window attention with sink tokens|1C
M30|SWAT: sigmoid sliding window|1C
M31|Neighborhood Attention (1-D, 2-D, dilation)|1C
M32|GNA: generalized neighborhood attention|1C
M33|HaloNets blocked local attention|1C
M34|CLEAR: conv-like local attention|1C
M35|PowerAttention|1C
M36|Block-sparse window + global + random|1C
M37|BiFormer bi-level routing attention|1C
M38|Routing Transformer|1C
M39|HyperAttention|1C
M40|HiP: hierarchically pruned attention|1C
M41|SEA: sparse attention with estimated mask|1C
M42|Landmark Attention|1C
M43|Top-Theta attention|1C
M44|Delta Attention (correction wrapper)|1C
M45|Rectified SpaAttn|1C
M46|S2-Attn (LongLoRA) and SF-Attn (SinkLoRA)|1C
M47|AHA: all-or-here attention|1C
M48|Query-adaptive long-context head selection|1C
M49|MoA: mixture of sparse attention|1C
M50|DuoAttention|1C
M51|Softplus attention with re-weighting|1D
M52|ReLU attention|1D
M53|Sigmoid attention|1D
M54|Selective self-attention|1D
M55|Cog attention (signed weights)|1D
M56|Affine-scaled attention|1D
M57|Multi-token attention|1D
M58|Gaussian adaptive attention|1D
M59|Kronecker / triple-wise attention|1D
M60|Adaptive filter attention|1D
M61.optimised|Optimised Attention (You Need to Pay Better Attention)|1D
M61.efficient|Efficient Attention (You Need to Pay Better Attention)|1D
M61.super|Super Attention (You Need to Pay Better Attention)|1D
M61.tab|TAB: bounded total attention|1D
M61.mhe|MHE: multi-head embedding (Pit One Against Many)|1D
M61.mlra|MLRA: multi-head low-rank attention|1D
M61.rcmha|RCMHA: relative-convolutional attention|1D
M61.mvpa|MVPA: multivariate parallel attention|1D
M61.stlink|ST-LINK SE-Attention (spatial RoPE)|1D
M61.attentiondrop|AttentionDrop (regulariser)|1D
M61.latent|Latent alignment and variational attention|1D
M62|Tree Cross Attention|1E
M63|Efficient Monotonic Multihead Attention|1E
M64|Efficient probing: multi-query cross-attention|1E
M65.perceiver|Perceiver-like query compression (CrossLMM)|1E
M65.masks|Block-mask cross designs (EE-MLLM, AKI, UniVoice, ScaleWeaver, VAR)|1E
M65.xpool|X-Pool text-conditioned cross-attention|1E
"""

CATALOG: "tuple[Mechanism, ...]" = tuple(
    Mechanism(*line.split("|")) for line in _ROWS.strip().splitlines()
)

# Entries no registered attention implements, with the reason (shown by `cab list --catalog`).
NOT_IMPLEMENTED: "dict[str, str]" = {
    "M28": "CARE's contribution is block-level (an asymmetric channel split between a kernel linear-attention "
           "branch and a depthwise-convolution branch, a cross-layer dynamic memory unit and a dual interaction "
           "module); its linear branch is plain kernel linear attention with no distinct (q, k, v) operator",
    "M61.optimised": "drops the value projection (values are the input's head slices, W_V folded into W_O): a "
                     "change to the projections around softmax attention; on projected (q, k, v) the operator is "
                     "softmax attention itself (vanilla, sdpa) — a backbone variant, not an operator",
    "M61.efficient": "also drops the key projection (keys and values are the input's head slices): a projection "
                     "re-parameterisation whose operator on (q, k, v) is softmax attention (vanilla, sdpa)",
    "M61.super": "mixes the values with a learned L x L matrix shared by the heads: tied to one sequence length, so "
                 "undefined across cab's length sweeps and the extrapolation task; its scores are plain softmax",
    "M61.tab": "a one-head bottleneck layer inserted into a model, with its total attention bounded to [0, 1] for "
               "interpretability: an architectural component, not a replacement operator (a bounded row total is "
               "covered by affine_scaled_attention, M56)",
    "M61.mhe": "one shared projection plus per-head embeddings instead of per-head projections: a parameter-sharing "
               "scheme for the projections; the operator on projected (q, k, v) is softmax attention",
    "M61.mlra": "factorises the multi-head projection matrices into low-rank per-head factors (to reduce embedding "
                "gradient variance): changes the projections, not the operator on (q, k, v)",
    "M61.mvpa": "separate content, temporal and spatial attention over the axes of a multivariate time series: a "
                "model design needing channel/time/space structure the (q, k, v) operator does not receive",
    "M61.stlink": "RoPE extended with spatial rotations: a positional encoding of q and k (needing spatial "
                  "coordinates) in front of softmax attention, not an attention operator",
    "M61.attentiondrop": "a training regulariser (top-k logit masking, Gaussian blur of logits, a consistency loss "
                         "over two passes): identity at evaluation, and its loss is model-level",
    "M61.latent": "attention as a latent alignment trained with a variational objective (sampling or enumeration "
                  "in the loss): a seq2seq training formulation, not a deterministic attention operator",
    "M64": "a probing head, not an operator: its queries are learned parameters and it returns one pooled "
           "vector per probe, not a row per query; its cross-attention without K/V projections is exact "
           "softmax cross-attention (vanilla/sdpa in NC)",
    "M65.xpool": "exact scaled dot-product cross-attention (text query over frame keys): vanilla/sdpa in NC; "
                 "its contribution is what attends to what, not the operator",
    "M65.masks": "arbitrary block masks (modality-mutual, dual causal/bidirectional, Markovian): cab's "
                 "operator takes a pattern, key padding and segment ids, which express none of them; they "
                 "need a per-(query, key) block-mask input, which FlexAttention's mask_mod offers",
}

_ID_RE = re.compile(r"M\d+(?:\.[a-z]+)?")


def mechanism_ids(text: str) -> "list[str]":
    """The catalogue ids an attention's `mechanism` field names ("M8,M9" -> ["M8", "M9"])."""
    return _ID_RE.findall(text or "")


@dataclass(frozen=True)
class CatalogRow:
    """A catalogue entry resolved against the registry."""

    mechanism: Mechanism
    attentions: "tuple[str, ...]"
    patterns: "tuple[str, ...]"
    reason: str

    @property
    def status(self) -> str:
        if self.attentions:
            return "implemented"
        return "not implemented" if self.reason else "missing"

    def to_dict(self) -> dict:
        return {"id": self.mechanism.id, "title": self.mechanism.title, "section": self.mechanism.section,
                "status": self.status, "attentions": list(self.attentions), "patterns": list(self.patterns),
                "reason": self.reason}


def catalog_rows() -> "list[CatalogRow]":
    """Every catalogue entry with the registered attentions claiming it and the union of their patterns."""
    claimed: dict[str, list] = {}
    for spec in registry.all_specs():
        for mid in mechanism_ids(spec.mechanism):
            claimed.setdefault(mid, []).append(spec)
    rows = []
    for mech in CATALOG:
        specs = claimed.get(mech.id, [])
        patterns = sorted({p.value for s in specs for p in s.patterns}, key="NS CS NC CC".split().index)
        rows.append(CatalogRow(mech, tuple(s.name for s in specs), tuple(patterns),
                               "" if specs else NOT_IMPLEMENTED.get(mech.id, "")))
    return rows


def unknown_claims() -> "dict[str, list[str]]":
    """Registered attentions naming a mechanism id absent from the catalogue (a typo or a new id)."""
    known = {m.id for m in CATALOG}
    bad: dict[str, list[str]] = {}
    for spec in registry.all_specs():
        for mid in mechanism_ids(spec.mechanism):
            if mid not in known:
                bad.setdefault(spec.name, []).append(mid)
    return bad
