"""Flowformer's Flow-Attention: linear attention normalised by conserved incoming and outgoing flows, with
source competition (a softmax over keys) and sink allocation (a sigmoid gate per query)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention
from cab.attention.engine.prefix_sums import DEFAULT_BLOCK, SEQ_CHUNK, chunks, decayed_causal_product
from cab.attention.engine.prepare import nonzero, prepare, zero_padded
from cab.patterns import Pattern
from cab.registry import register_attention

CC_REASON = ("Flow-Attention's outgoing flow of every key sums over all queries and enters the output through a "
             "clamp and a softmax over keys; a per-query prefix variant would recompute both for every query, "
             "O(Lq Lk), and the paper's causal variant needs queries and keys to share positions")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(.., L, d) . (.., L, d) -> (.., L)."""
    return (a * b).sum(dim=-1)


@register_attention(
    "flowformer", patterns=("NS", "CS", "NC"), family="linear", exact=False, mechanism="M10",
    citation="Wu, Wu, Xu, Wang & Long, Flowformer: Linearizing Transformers with Conservation Flows, ICML 2022",
    unsupported={"CC": CC_REASON},
)
class FlowformerAttention(Attention):
    """Flow-Attention (paper Sec. 3, Eq. 4-9), with phi = sigmoid and eps = 1e-6 placed as in the authors'
    code. Noncausal (NS, NC), over the real queries i and real keys j (nq, nk their counts):

        I_i = 1 / (phi(q_i)+eps).(sum_j phi(k_j) + eps)          incoming flow of sink i (inverse)
        O_j = 1 / (phi(k_j)+eps).(sum_i phi(q_i) + eps)          outgoing flow of source j (inverse)
        Ihat_i = (phi(q_i)+eps).(sum_j phi(k_j) O_j + eps)        conserved incoming flow
        Ohat_j = clamp((phi(k_j)+eps).(sum_i phi(q_i) I_i + eps), -1, 1)   conserved outgoing flow
        R_i = sigmoid(Ihat_i nq / nk) * (phi(q_i) I_i) . sum_j phi(k_j) (softmax_j(Ohat) nk v_j)^T

    (allocation sigmoid(.) per sink, competition softmax(.) nk per source). Causal self attention (CS) is
    the paper's causal variant (the released Flow_Attention_Causal): every sum becomes a prefix sum, the
    flows are rescaled by the number of tokens in the prefix (the "normal" counts), the competition is
    exp(Ohat_j) / sum_{s<=j} exp(Ohat_s) * n_j and the allocation sigmoid(Ihat_i); computed with cumulative
    sums of per-token vectors (O(L d) memory) and the tiled causal product for the final kernel product.

    Padding: padded keys leave every key sum, count and the competition; in self patterns the queries at
    padded positions leave every query sum too (they are the same padding tokens), so trailing padding
    changes nothing. CS with Lq != Lk is bottom-right aligned; the key-only prefix positions (Lk > Lq) have
    no query and count as absent queries. A row that sees no key outputs 0. CC is not supported: see the
    registered reason. Not included: the projections (backbone). No incremental decoding: the causal flows
    of a past key depend on the queries up to it, and the decoding contract's decode_init receives only the
    prefix's keys and values.
    """

    def __init__(self, pattern, num_heads, head_dim, eps: float = 1e-6, block_size: int = DEFAULT_BLOCK):
        super().__init__(pattern, num_heads, head_dim)
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.eps, self.block_size = eps, block_size
        self.seq_chunk = block_size * max(1, SEQ_CHUNK // block_size)  # tokens per chunk of the sequence loop

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, block_size={self.block_size}"

    def _real(self, q, k, key_padding_mask, drop):
        """(rq (B, 1, Lq, 1), rk (B, 1, Lk, 1)): 1.0 for real queries / keys (after alignment)."""
        b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        rk = torch.ones(b, 1, lk, 1, dtype=q.dtype, device=q.device)
        if key_padding_mask is not None:
            rk = (~key_padding_mask).to(q.dtype)[:, None, :, None]
        if self.cross:
            return torch.ones(b, 1, lq, 1, dtype=q.dtype, device=q.device), rk
        rq = rk.clone() if lq == lk else torch.ones(b, 1, lq, 1, dtype=q.dtype, device=q.device)
        if drop:
            rq[:, :, :drop] = 0.0
        return rq, rk

    def _inputs(self, q, k, v, key_padding_mask):
        out_dtype = q.dtype
        q, k, v, key_padding_mask, drop, _ = prepare(self, q, k, v, key_padding_mask)
        rq, rk = self._real(q, k, key_padding_mask, drop)
        phi_q, phi_k = torch.sigmoid(q), torch.sigmoid(zero_padded(k, key_padding_mask))
        return phi_q, phi_k, v, rq, rk, drop, out_dtype

    def forward(self, q, k, v, key_padding_mask=None):
        """The flows over chunks of `seq_chunk` tokens, so no temporary spans the sequence: noncausal in
        four sweeps (global sums; outgoing and incoming flows; competition and the key-value summary;
        outputs), CS in one sweep with every prefix sum and the tiled product's state carried."""
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        rq, rk = self._real(q, k, key_padding_mask, drop)

        def phi_k(a, b):
            pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
            return torch.sigmoid(zero_padded(k[:, :, a:b], pad))

        run = self._causal_chunks if self.pattern is Pattern.CS else self._noncausal_chunks
        out = run(q, phi_k, v, rq, rk)
        return out[:, :, drop:].to(out_dtype)

    def _noncausal_chunks(self, q, phi_k, v, rq, rk):
        eps, size = self.eps, self.seq_chunk
        key_chunks, query_chunks = chunks(rk.shape[-2], size), chunks(rq.shape[-2], size)
        phi_q = lambda a, b: torch.sigmoid(q[:, :, a:b])  # noqa: E731
        k_sum = sum((phi_k(a, b) * rk[:, :, a:b]).sum(dim=-2, keepdim=True) for a, b in key_chunks)
        q_sum = sum((phi_q(a, b) * rq[:, :, a:b]).sum(dim=-2, keepdim=True) for a, b in query_chunks)
        nk, nq = rk.sum(dim=-2, keepdim=True), rq.sum(dim=-2, keepdim=True)
        sink_sum = source_sum = 0
        for a, b in key_chunks:
            fk = phi_k(a, b)
            outgoing = 1.0 / _dot(fk + eps, q_sum + eps)
            sink_sum = sink_sum + (fk * rk[:, :, a:b] * outgoing.unsqueeze(-1)).sum(dim=-2, keepdim=True)
        for a, b in query_chunks:
            fq = phi_q(a, b)
            incoming = 1.0 / _dot(fq + eps, k_sum + eps)
            source_sum = source_sum + (fq * rq[:, :, a:b] * incoming.unsqueeze(-1)).sum(dim=-2, keepdim=True)
        kv = z = 0  # the softmax over keys without a maximum: its logits are clamped to [-1, 1]
        for a, b in key_chunks:
            fk, real = phi_k(a, b), rk[:, :, a:b]
            source = _dot(fk + eps, source_sum + eps).clamp(-1.0, 1.0)
            weight = torch.exp(source) * real.squeeze(-1)
            z = z + weight.sum(dim=-1, keepdim=True)
            kv = kv + (fk * real).transpose(-1, -2) @ (v[:, :, a:b] * weight.unsqueeze(-1))
        kv = kv * (nk.squeeze(-1) / nonzero(z)).unsqueeze(-1)
        outs = []
        for a, b in query_chunks:
            fq = phi_q(a, b)
            incoming = 1.0 / _dot(fq + eps, k_sum + eps)
            sink = _dot(fq + eps, sink_sum + eps)
            allocation = torch.sigmoid(sink * (nq / nonzero(nk)).squeeze(-1))
            outs.append(((fq * incoming.unsqueeze(-1)) @ kv) * allocation.unsqueeze(-1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return torch.where(nk > 0, out, torch.zeros_like(out))

    def _causal_chunks(self, q, phi_k, v, rq, rk):
        eps = self.eps
        carry = dict(nk=0, nq=0, k_cum=0, q_cum=0, sink=0, source=0, exp=0)
        state, outs = None, []

        def prefix(name, x):
            total = x.cumsum(dim=-2) + carry[name]
            carry[name] = total[:, :, -1:]
            return total

        for a, b in chunks(q.shape[-2], self.seq_chunk):
            fq, fk, real_q, real_k = torch.sigmoid(q[:, :, a:b]), phi_k(a, b), rq[:, :, a:b], rk[:, :, a:b]
            nk, nq = prefix("nk", real_k), prefix("nq", real_q)
            incoming = nk.squeeze(-1) / _dot(fq + eps, prefix("k_cum", fk * real_k) + eps)
            outgoing = nq.squeeze(-1) / _dot(fk + eps, prefix("q_cum", fq * real_q) + eps)
            sink = _dot(fq + eps, prefix("sink", fk * real_k * outgoing.unsqueeze(-1)) + eps) / nonzero(nk).squeeze(-1)
            source = _dot(fk + eps, prefix("source", fq * real_q * incoming.unsqueeze(-1)) + eps)
            source = (source / nonzero(nq).squeeze(-1)).clamp(-1.0, 1.0)
            exp_source = torch.exp(source) * real_k.squeeze(-1)
            competition = exp_source / nonzero(prefix("exp", exp_source.unsqueeze(-1)).squeeze(-1)) * nk.squeeze(-1)
            query_side = fq * (incoming / nonzero(nk).squeeze(-1)).unsqueeze(-1)
            out, state = decayed_causal_product(query_side, fk * real_k, v[:, :, a:b] * competition.unsqueeze(-1),
                                                None, self.block_size, state=state, return_state=True)
            out = out * torch.sigmoid(sink).unsqueeze(-1)
            outs.append(torch.where(nk > 0, out, torch.zeros_like(out)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def reference(self, q, k, v, key_padding_mask=None):
        """The same flows with every sum written as an explicit masked (L x L) matrix product — the
        prefix sums of CS as products with a lower-triangular matrix — and the final output as the explicit
        weight matrix R_ij = alloc_i (phi(q_i) I_i).phi(k_j) comp_j, times V."""
        phi_q, phi_k, v, rq, rk, drop, out_dtype = self._inputs(q, k, v, key_padding_mask)
        if self.pattern is Pattern.CS:
            length = phi_q.shape[-2]
            tril = torch.ones(length, length, dtype=phi_q.dtype, device=phi_q.device).tril()
            out = self._causal_dense(phi_q, phi_k, v, rq, rk, lambda x: tril @ x, tril)
        else:
            out = self._noncausal_dense(phi_q, phi_k, v, rq, rk)
        return out[:, :, drop:].to(out_dtype)

    def _noncausal_dense(self, phi_q, phi_k, v, rq, rk):
        """The noncausal flows for the reference: sums over keys and queries as products with the explicit
        masks, the output as the explicit (Lq x Lk) weight matrix."""
        eps = self.eps
        visible = rq.new_ones(rq.shape[0], 1, rq.shape[-2], 1) * rk.transpose(-1, -2)  # (B, 1, Lq, Lk)
        over_keys = lambda x: visible @ x  # noqa: E731  (.., Lk, m) -> (.., Lq, m): the same sum per row
        over_queries = lambda x: (rq.transpose(-1, -2) @ x)  # noqa: E731
        nk = rk.sum(dim=-2, keepdim=True)
        nq = rq.sum(dim=-2, keepdim=True)
        k_sum = over_keys(phi_k)
        q_sum = over_queries(phi_q)
        incoming = 1.0 / _dot(phi_q + eps, k_sum + eps)  # (B, H, Lq)
        outgoing = 1.0 / _dot(phi_k + eps, q_sum + eps)  # (B, H, Lk)
        sink = _dot(phi_q + eps, over_keys(phi_k * outgoing.unsqueeze(-1)) + eps)
        source = _dot(phi_k + eps, over_queries(phi_q * incoming.unsqueeze(-1)) + eps).clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink * (nq / nonzero(nk)).squeeze(-1))
        real_k = rk.squeeze(-1) > 0
        logits = source.masked_fill(~real_k, float("-inf"))
        logits = torch.where(real_k.any(dim=-1, keepdim=True), logits, torch.zeros_like(logits))
        competition = torch.softmax(logits, dim=-1) * nk.squeeze(-1) * rk.squeeze(-1)
        query_side = phi_q * incoming.unsqueeze(-1)
        values = v * competition.unsqueeze(-1)
        weights = (query_side @ phi_k.transpose(-1, -2)) * rk.transpose(-1, -2)
        out = (weights @ values) * allocation.unsqueeze(-1)
        return torch.where(nk > 0, out, torch.zeros_like(out))

    def _causal_dense(self, phi_q, phi_k, v, rq, rk, prefix, tril):
        """The causal flows for the reference: `prefix` sums over positions <= t as a product with the
        lower-triangular matrix `tril`, the output as the explicit masked weight matrix."""
        eps = self.eps
        nk, nq = prefix(rk), prefix(rq)  # (B, 1, L, 1)
        k_cum = prefix(phi_k * rk)
        q_cum = prefix(phi_q * rq)
        incoming = nk.squeeze(-1) / _dot(phi_q + eps, k_cum + eps)  # normal-scaled, as the released code
        outgoing = nq.squeeze(-1) / _dot(phi_k + eps, q_cum + eps)
        sink = _dot(phi_q + eps, prefix(phi_k * rk * outgoing.unsqueeze(-1)) + eps) / nonzero(nk).squeeze(-1)
        source = _dot(phi_k + eps, prefix(phi_q * rq * incoming.unsqueeze(-1)) + eps) / nonzero(nq).squeeze(-1)
        source = source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink)
        exp_source = torch.exp(source) * rk.squeeze(-1)
        competition = exp_source / nonzero(prefix(exp_source.unsqueeze(-1)).squeeze(-1)) * nk.squeeze(-1)
        query_side = phi_q * (incoming / nonzero(nk).squeeze(-1)).unsqueeze(-1)
        values = v * competition.unsqueeze(-1)
        weights = (query_side @ (phi_k * rk).transpose(-1, -2)) * tril
        out = weights @ values
        out = out * allocation.unsqueeze(-1)
        return torch.where(nk > 0, out, torch.zeros_like(out))

    complexity = {"time": 1, "memory": 1}
