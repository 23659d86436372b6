"""The computation engine every mechanism module builds on, one module per thing it computes. Mechanisms import
from here (and from `cab.attention.base`), never from one another.

- `prepare`: input preparation (accumulation dtype, grouped heads, bottom-right alignment, real keys and query
  positions, the zero-safe normaliser).
- `masks`: composable element masks `mask_fn(b, h, i, j)` (FlexAttention's mask_mod signature), one definition
  for the dense, blocked and FlexAttention paths.
- `prefix_sums`: noncausal key summaries and chunked causal prefix products of linear attention.
- `feature_map`: feature maps, their random features and the normalised feature-map attention base.
- `convolution`: depthwise and Toeplitz (FFT) convolutions along the sequence.
- `scores`: dense and row-blocked masked softmax and row-wise score functions.
- `kv_cache`: the KV cache of incremental decoding and the attention base that decodes over it.
- `blocksparse`: block layouts and the gathered block-sparse softmax (torch and FlexAttention).
- `routing`: content-based key selection (pooling, top-k, hashing) and the gathered softmax over a selection.
- `block_pairs`: softmax over selected key blocks, one matmul per block with the queries that chose it.
- `head_windows`: per-head sliding-window or full attention, routed per row.
- `rotary`: rotations of channel pairs (rotary position embeddings).

The registry's loader imports no module of this package (it is a package, not a mechanism module).
"""
