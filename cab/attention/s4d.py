"""S4D: a diagonal state space layer used in the attention slot (a long convolution over the values)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import compute_dtype
from cab.registry import register_attention

INITS = ("inv", "lin")


def ssm_modes(a_log_neg_real: torch.Tensor, a_imag: torch.Tensor, log_dt: torch.Tensor, c: torch.Tensor,
              dtype: torch.dtype) -> "tuple[torch.Tensor, torch.Tensor]":
    """(dt*A, C') of the zero-order-hold discretisation with B = 1 folded into C:
    K[l] = 2 Re sum_n C'_n exp(dt A_n l), C'_n = C_n (exp(dt A_n) - 1) / A_n. Shapes (channels, N/2)."""
    real = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.complex(-torch.exp(a_log_neg_real.to(real)), a_imag.to(real))
    dt_a = a * torch.exp(log_dt.to(real))[:, None]
    c_prime = torch.view_as_complex(c.to(real).contiguous()) * torch.expm1(dt_a) / a
    return dt_a, c_prime


def _cexp(z: torch.Tensor) -> torch.Tensor:
    """exp of a complex tensor through real exp, cos and sin (vectorised; complex exp is not on CPU)."""
    return torch.polar(torch.exp(z.real), z.imag)


def ssm_kernel(dt_a: torch.Tensor, c_prime: torch.Tensor, length: int) -> torch.Tensor:
    """K (channels, length) with K[l] = 2 Re sum_n C'_n exp(dt A_n)^l, evaluated blockwise: l = i*s + j,
    exp(dt A l) = exp(dt A s i) exp(dt A j), so only O(N sqrt(L)) exponentials and one batched matmul
    (done in real arithmetic: Re(x y) = Re x Re y - Im x Im y)."""
    block = max(1, math.isqrt(length))
    blocks = -(-length // block)
    steps = torch.arange(block, device=dt_a.device, dtype=dt_a.real.dtype)
    starts = torch.arange(blocks, device=dt_a.device, dtype=dt_a.real.dtype) * block
    inner = _cexp(dt_a[:, :, None] * steps)  # (C, N/2, block)
    outer = _cexp(dt_a[:, None, :] * starts[None, :, None]) * c_prime[:, None, :]  # (C, blocks, N/2)
    kernel = 2 * (torch.cat([outer.real, -outer.imag], dim=-1) @ torch.cat([inner.real, inner.imag], dim=-2))
    return kernel.reshape(dt_a.shape[0], blocks * block)[:, :length]


@register_attention(
    "s4d", patterns=("NS", "CS"), family="state-space", exact=False,
    citation="Gu, Gupta, Goel & Re, On the Parameterization and Initialization of Diagonal State Space "
    "Models (S4D), NeurIPS 2022",
    unsupported={
        "NC": "a state space layer maps one sequence to itself position by position; it has no way to read "
        "a second (key) sequence of another length",
        "CC": "a state space layer maps one sequence to itself position by position; it has no way to read "
        "a second (key) sequence of another length",
    },
)
class S4DAttention(Attention):
    """Diagonal state space model (S4D, Gu et al. 2022, Sec. 2-3) in the attention slot.

    It IGNORES q and k: the output is the SSM applied to the values, one independent single-input
    channel per (query head, feature): y = K * v + D v, with the convolution kernel
    K[l] = 2 Re sum_n C_n (exp(dt A_n) - 1) / A_n exp(dt A_n l) (zero-order hold, B = 1 folded into C,
    N/2 = d_state/2 complex-conjugate modes). A is S4D-Inv (A_n = -1/2 + i N/pi (N/(2n+1) - 1), CAB's
    default) or S4D-Lin (A_n = -1/2 + i pi n); C ~ complex normal; log dt ~ U[log dt_min, log dt_max];
    D ~ normal. All are learnable parameters drawn from torch's global generator at construction.

    NS is bidirectional: a second kernel with its own C runs over the strictly later positions
    (y_i += sum_{j>i} K'[j-i-1] v_j), as CAB and S4 build it; CS uses the causal kernel only, so row i
    depends on v_0..v_i. The convolution is done by FFT (O(L log L)); the kernel is evaluated blockwise.
    Padded keys have their values zeroed before the convolution, so they contribute nothing. Self
    patterns with Lq < Lk output the last Lq positions (query i sits at key position i + Lk - Lq).
    Grouped-query values are shared through `repeat_kv`. Incremental decoding (CS): `decode_init` /
    `decode_step` carry the complex state x (B, channels, N/2) of the recurrence, O(N) per channel per token.

    Differences from CAB: CAB's S4D ignored the causal flag (it was causal unless built bidirectional);
    here the pattern decides. CAB's layer also applied GELU, dropout and an output linear layer inside
    the attention; those belong to the backbone's block and are not part of this mechanism.
    """

    def __init__(self, pattern, num_heads, head_dim, d_state: int = 16, init: str = "inv",
                 dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__(pattern, num_heads, head_dim)
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even number >= 2, got {d_state}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_state, self.init = d_state, init
        channels, modes = num_heads * head_dim, d_state // 2
        n = torch.arange(modes, dtype=torch.float32)
        imag = math.pi * n if init == "lin" else d_state / math.pi * (d_state / (2 * n + 1) - 1)
        self.a_log_neg_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.a_imag = nn.Parameter(imag.repeat(channels, 1))
        self.log_dt = nn.Parameter(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        directions = 1 if self.causal else 2
        # C as (real, imag) pairs, each N(0, 1/2): a standard complex normal
        self.c = nn.Parameter(torch.randn(directions, channels, modes, 2) * math.sqrt(0.5))
        self.d_skip = nn.Parameter(torch.randn(channels))

    def _values(self, q, v, key_padding_mask):
        """v as (B, Hq, L, D) with padded positions zeroed; checks the self-pattern lengths."""
        if q.shape[-2] > v.shape[-2]:
            raise ValueError(f"s4d maps a sequence to itself: Lq ({q.shape[-2]}) cannot exceed Lk ({v.shape[-2]})")
        v = repeat_kv(v, q.shape[1])
        if key_padding_mask is not None:
            v = v.masked_fill(key_padding_mask.to(device=v.device, dtype=torch.bool)[:, None, :, None], 0.0)
        return v

    def forward(self, q, k, v, key_padding_mask=None):
        lq, out_dtype = q.shape[-2], v.dtype
        v = self._values(q, v, key_padding_mask).to(compute_dtype(v.dtype))  # no half-precision FFT on CPU
        b, h, length, d = v.shape
        u = v.permute(0, 1, 3, 2).reshape(b, h * d, length)  # channel (head, feature) along dim 1
        kernels = []
        for direction in range(self.c.shape[0]):
            dt_a, c_prime = ssm_modes(self.a_log_neg_real, self.a_imag, self.log_dt, self.c[direction], v.dtype)
            kernels.append(ssm_kernel(dt_a, c_prime, length).to(v.dtype))
        if len(kernels) == 1:  # causal: zero-pad to 2L so the circular convolution is a linear one
            kernel = torch.cat([kernels[0], torch.zeros_like(kernels[0])], dim=-1)
        else:  # bidirectional: index 2L - 1 - m of the circular kernel holds K'[m] (key m + 1 after the query)
            kernel = torch.cat([kernels[0], kernels[1].flip(-1)], dim=-1)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(kernel, n=2 * length), n=2 * length)
        y = y[..., :length] + u * self.d_skip.to(v.dtype)[:, None]
        return y.reshape(b, h, d, length).permute(0, 1, 3, 2)[:, :, length - lq:].to(out_dtype)

    def _recurrence(self, dtype: torch.dtype) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """(exp(dt A), (exp(dt A) - 1) / A, C (directions, channels, N/2)): the discrete recurrence."""
        real = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.complex(-torch.exp(self.a_log_neg_real.to(real)), self.a_imag.to(real))
        step = a * torch.exp(self.log_dt.to(real))[:, None]
        return torch.exp(step), (torch.exp(step) - 1) / a, torch.view_as_complex(self.c.to(real).contiguous())

    def reference(self, q, k, v, key_padding_mask=None):
        """The recurrence itself: x_t = exp(dt A) x_{t-1} + (exp(dt A) - 1)/A v_t, y_t = 2 Re(C x_t) + D v_t,
        a loop over positions (and, for NS, the same recurrence run backwards over the later positions)."""
        lq = q.shape[-2]
        v = self._values(q, v, key_padding_mask)
        b, h, length, d = v.shape
        u = v.permute(0, 1, 3, 2).reshape(b, h * d, length)
        decay, gain, c = self._recurrence(v.dtype)
        outputs = [u[..., t] * self.d_skip.to(v.dtype) for t in range(length)]
        state = torch.zeros(b, h * d, decay.shape[-1], dtype=decay.dtype, device=v.device)
        for t in range(length):
            state = decay * state + gain * u[..., t, None]
            outputs[t] = outputs[t] + 2 * (state * c[0]).sum(-1).real.to(v.dtype)
        if c.shape[0] == 2:
            state = torch.zeros_like(state)
            for t in range(length - 2, -1, -1):
                state = decay * state + gain * u[..., t + 1, None]
                outputs[t] = outputs[t] + 2 * (state * c[1]).sum(-1).real.to(v.dtype)
        y = torch.stack(outputs, dim=-1)
        return y.reshape(b, h, d, length).permute(0, 1, 3, 2)[:, :, length - lq:]

    # incremental decoding (CS): the state is the complex SSM state x, (B, channels, N/2) ----------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """The state after the values v (B, Hkv, L0, D) (padded ones count as zero):
        x = sum_j exp(dt A)^(L0 - 1 - j) (exp(dt A) - 1)/A v_j. q and k play no part, as in forward."""
        if not self.causal:
            raise NotImplementedError("s4d decodes only under CS; its NS layer reads the whole sequence")
        v = repeat_kv(v, self.num_heads)
        if key_padding_mask is not None:
            v = v.masked_fill(key_padding_mask.to(device=v.device, dtype=torch.bool)[:, None, :, None], 0.0)
        u = v.permute(0, 1, 3, 2).flatten(1, 2)  # (B, C, L0), channel (head, feature)
        decay, gain, _ = self._recurrence(v.dtype)
        ages = torch.arange(u.shape[-1] - 1, -1, -1, device=v.device, dtype=decay.real.dtype)
        weights = gain[..., None] * _cexp(torch.log(decay)[..., None] * ages)  # (C, N/2, L0)
        return torch.einsum("bcl,cnl->bcn", u.to(decay.dtype), weights)

    def decode_step(self, state, q, k=None, v=None):
        """One token: x <- exp(dt A) x + (exp(dt A) - 1)/A v_t, output 2 Re(C x) + D v_t, (B, Hq, 1, D)."""
        u = repeat_kv(v, q.shape[1]).flatten(1, 3)  # (B, C): channel (head, feature)
        decay, gain, c = self._recurrence(v.dtype)
        state = decay * state + gain * u[..., None]
        out = 2 * (state * c[0]).sum(-1).real.to(v.dtype) + u * self.d_skip.to(v.dtype)
        return out.reshape(q.shape[0], q.shape[1], 1, -1), state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_state={self.d_state}, init={self.init}"
