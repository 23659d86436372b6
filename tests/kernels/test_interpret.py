"""cab's Triton kernels checked on CPU under the Triton interpreter, in float32 against their pure-PyTorch
references (evaluated in float64): outputs and gradients, odd lengths, several head dims, Lq != Lk, padding,
per-head decay; the window kernel's block skipping (keys in skipped blocks are NaN and must not reach the
output); and the `linear_elu` / `sliding_window` attentions on their triton backend.

TRITON_INTERPRET must be set before triton is imported, and the rest of the suite imports triton without
it, so the checks run in a child process (this file run as a script, one process per kernel family) and
each case is reported back as JSON; the tests here only read the verdicts. Sizes are tiny: the interpreter
is 200-500x slower than a compiled kernel."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

LINEAR_CASES = {
    # name: (kind, kwargs)
    "causal_decay_den_L37_d16": ("causal", dict(L=37, dk=16, dv=16, decay=(0.0, 0.3), den=True, block_c=16)),
    "causal_sequential_decay_den_L37_d16": ("causal", dict(L=37, dk=16, dv=16, decay=(0.0, 0.3), den=True,
                                                           block_c=16, schedule="sequential")),
    "causal_sequential_nodecay_L50_dk8_dv24": ("causal", dict(L=50, dk=8, dv=24, decay=None, den=False, block_c=16,
                                                              schedule="sequential")),
    "causal_decay_den_L21_dk80_two_key_blocks": ("causal", dict(L=21, dk=80, dv=16, decay=(0.1, 0.0), den=True,
                                                                block_c=16)),
    "causal_nodecay_L50_dk8_dv24": ("causal", dict(L=50, dk=8, dv=24, decay=None, den=False, block_c=16)),
    "causal_decay_den_L33_dk32_dv8": ("causal", dict(L=33, dk=32, dv=8, decay=(0.05, 1.5), den=True, block_c=16)),
    "causal_fp16_decay_den_L37_d16": ("causal", dict(L=37, dk=16, dv=16, decay=(0.0, 0.3), den=True, block_c=16,
                                                     dtype="float16")),
    "noncausal_den_37x29_dk16_dv8": ("noncausal", dict(lq=37, lk=29, dk=16, dv=8, den=True)),
    "noncausal_20x45_dk24_dv16": ("noncausal", dict(lq=20, lk=45, dk=24, dv=16, den=False)),
    "noncausal_fp16_den_37x29_dk16_dv16": ("noncausal", dict(lq=37, lk=29, dk=16, dv=16, den=True, dtype="float16")),
    "based_taylor_features_L29_d4": ("based", dict(L=29, d=4)),
    "linear_elu_CS_21x30_gqa_pad": ("attention", dict(name="linear_elu", pattern="CS", lq=21, lk=30, d=8)),
    "linear_elu_NC_19x26_gqa_pad": ("attention", dict(name="linear_elu", pattern="NC", lq=19, lk=26, d=16)),
    "lightning_CS_21x30_gqa_pad": ("attention", dict(name="lightning", pattern="CS", lq=21, lk=30, d=16,
                                                     hparams=dict(block_size=16))),
    "lightning_NS_decay_29_gqa_pad": ("attention", dict(name="lightning", pattern="NS", lq=29, lk=29, d=16,
                                                        hparams=dict(block_size=16))),
}
WINDOW_CASES = {
    "NS_37_d16_w5_pad": ("window", dict(lq=37, lk=37, d=16, w=5, s=0, causal=False)),
    "CS_37_d8_w4_s2_pad": ("window", dict(lq=37, lk=37, d=8, w=4, s=2, causal=True)),
    "CS_20x45_d16_w3_s3_pad": ("window", dict(lq=20, lk=45, d=16, w=3, s=3, causal=True)),
    "CS_45x20_d32_w2_s1_pad": ("window", dict(lq=45, lk=20, d=32, w=2, s=1, causal=True)),
    "CS_fp16_37_d16_w4_s2_pad": ("window", dict(lq=37, lk=37, d=16, w=4, s=2, causal=True, dtype="float16")),
    "NS_29_w40_wider_than_L": ("window", dict(lq=29, lk=29, d=16, w=40, s=0, causal=False)),
    "skips_blocks_NS": ("skip", dict(causal=False, s=0, rows=(0, 16), poison=(32, 64))),
    "skips_blocks_CS_sinks": ("skip", dict(causal=True, s=2, rows=(48, 64), poison=(16, 32))),
    "sliding_window_CS_gqa_pad": ("attention", dict(name="sliding_window", pattern="CS", lq=33, lk=33, d=16,
                                                    hparams=dict(window=4, sinks=1))),
}
GROUPS = {"linear": LINEAR_CASES, "window": WINDOW_CASES}


# ---- the child process: runs the cases of one group under the interpreter ---------------------------------

# float32 runs the IEEE dot products; float16 the tensor-core path that bfloat16 takes on a GPU (the
# interpreter's bfloat16 tl.dot is broken: numpy has no bfloat16), with fp16's tolerance
RTOL = {"float32": 2e-5, "float16": 4e-3}


def _close(name, got, want, rtol=2e-5):
    """None when `got` matches the float64 `want` to rtol of its largest magnitude, else a message."""
    import torch

    want = want.detach().to(torch.float64)
    got = got.detach().to(torch.float64)
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not bool(torch.isfinite(got).all()):
        return f"{name}: non-finite values"
    err = float((got - want).abs().max())
    bound = rtol * max(1.0, float(want.abs().max()))
    return None if err <= bound else f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _inputs(shapes, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def _compare(fn32, fn64, tensors, names=("q", "k", "v"), dtype="float32"):
    """Outputs of fn32 on `dtype` copies vs fn64 on float64, and the gradients of <out, cotangent>."""
    import torch

    rtol = RTOL[dtype]
    x32 = [t.to(getattr(torch, dtype)).requires_grad_() for t in tensors]
    x64 = [t.clone().requires_grad_() for t in tensors]
    outs32, outs64 = fn32(*x32), fn64(*x64)
    if not isinstance(outs32, tuple):
        outs32, outs64 = (outs32,), (outs64,)
    gen = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs64]
    problems = [_close(f"out{i}", a, b, rtol) for i, (a, b) in enumerate(zip(outs32, outs64))]
    loss32 = sum((o.double() * c).sum() for o, c in zip(outs32, cots))
    loss64 = sum((o * c).sum() for o, c in zip(outs64, cots))
    for name, a, b in zip(names, torch.autograd.grad(loss32, x32), torch.autograd.grad(loss64, x64)):
        problems.append(_close(f"d{name}", a, b, rtol))
    return [p for p in problems if p]


def _case(kind, kw):
    import torch

    from cab import create_attention
    from cab.attention.kernels import linear, window

    if kind == "causal":
        b, h = 2, 2
        q, k, v = _inputs([(b, h, kw["L"], kw["dk"]), (b, h, kw["L"], kw["dk"]), (b, h, kw["L"], kw["dv"])])
        decay = None if kw["decay"] is None else torch.tensor(kw["decay"], dtype=torch.float64)
        fn32 = lambda q, k, v: linear.causal_linear_attention(  # noqa: E731
            q, k, v, decay, with_normaliser=kw["den"], block_c=kw["block_c"], block_e=16,
            schedule=kw.get("schedule", "chunked"))
        fn64 = lambda q, k, v: (lambda r: r if kw["den"] else r[0])(  # noqa: E731
            linear.linear_attention_reference(q, k, v, decay, causal=True))
        return _compare(fn32, fn64, [q, k, v])
    if kind == "based":
        # BASED's 2nd-order Taylor feature map phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))], so
        # phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d): the causal kernel (no decay, normaliser on)
        # computes BASED's linear branch once the features are applied (d = 4: 21 features).
        d = kw["d"]
        q, k, v = _inputs([(2, 2, kw["L"], d), (2, 2, kw["L"], d), (2, 2, kw["L"], 8)])

        def taylor(x):
            outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (2 ** 0.5 * d ** 0.5)
            return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer], dim=-1)

        def fn32(q, k, v):
            num, den = linear.causal_linear_attention(taylor(q), taylor(k), v, with_normaliser=True, block_c=16)
            return num / den.unsqueeze(-1)

        def fn64(q, k, v):
            s = (q @ k.transpose(-1, -2)) / d ** 0.5
            weights = (1 + s + s * s / 2).tril()
            return (weights @ v) / weights.sum(-1, keepdim=True)

        return _compare(fn32, fn64, [q, k, v], dtype=kw.get("dtype", "float32"))
    if kind == "noncausal":
        b, h = 2, 2
        q, k, v = _inputs([(b, h, kw["lq"], kw["dk"]), (b, h, kw["lk"], kw["dk"]), (b, h, kw["lk"], kw["dv"])])
        fn32 = lambda q, k, v: linear.noncausal_linear_attention(q, k, v, with_normaliser=kw["den"], block_l=16)  # noqa: E731
        fn64 = lambda q, k, v: (lambda r: r if kw["den"] else r[0])(  # noqa: E731
            linear.linear_attention_reference(q, k, v, None, causal=False))
        return _compare(fn32, fn64, [q, k, v], dtype=kw.get("dtype", "float32"))
    if kind == "window":
        b, h = 2, 2
        q, k, v = _inputs([(b, h, kw["lq"], kw["d"]), (b, h, kw["lk"], kw["d"]), (b, h, kw["lk"], kw["d"])])
        pad = torch.zeros(b, kw["lk"], dtype=torch.bool)
        pad[1, -3:] = True
        pad[0, 0] = True
        pad[0, kw["lk"] // 2] = True
        args = (kw["w"], kw["s"], kw["causal"], pad)
        fn32 = lambda q, k, v: window.window_attention(q, k, v, *args, block_m=16, block_n=16)  # noqa: E731
        fn64 = lambda q, k, v: window.window_attention_reference(q, k, v, *args)  # noqa: E731
        return _compare(fn32, fn64, [q, k, v], dtype=kw.get("dtype", "float32"))
    if kind == "skip":
        # L = 64 in blocks of 16, window 3: the rows `rows` never need the keys `poison`, which hold NaN; had
        # their blocks been loaded, 0 * NaN would reach these rows' outputs and query gradients.
        q, k, v = _inputs([(1, 1, 64, 16)] * 3)
        lo, hi = kw["poison"]
        r0, r1 = kw["rows"]
        args = (3, kw["s"], kw["causal"], None)
        ref = window.window_attention_reference(q, k, v, *args)
        k_bad, v_bad = k.float().clone(), v.float().clone()
        k_bad[..., lo:hi, :], v_bad[..., lo:hi, :] = float("nan"), float("nan")
        q32 = q.float().requires_grad_()
        out = window.window_attention(q32, k_bad, v_bad, *args, block_m=16, block_n=16)
        problems = [_close("out rows", out[..., r0:r1, :], ref[..., r0:r1, :])]
        cot = torch.zeros_like(out)
        cot[..., r0:r1, :] = 1.0
        (dq,) = torch.autograd.grad(out, q32, cot)
        q64 = q.clone().requires_grad_()
        (dq_ref,) = torch.autograd.grad(window.window_attention_reference(q64, k, v, *args), q64, cot.double())
        problems.append(_close("dq rows", dq[..., r0:r1, :], dq_ref[..., r0:r1, :]))
        return [p for p in problems if p]
    if kind == "attention":
        attn = create_attention(kw["name"], kw["pattern"], 4, kw["d"], backend="triton", **kw.get("hparams", {}))
        q, k, v = _inputs([(2, 4, kw["lq"], kw["d"]), (2, 2, kw["lk"], kw["d"]), (2, 2, kw["lk"], kw["d"])])
        pad = torch.zeros(2, kw["lk"], dtype=torch.bool)
        pad[1, -3:] = True
        pad[0, 1] = True
        problems = _compare(lambda q, k, v: attn(q, k, v, pad), lambda q, k, v: attn.reference(q, k, v, pad),
                            [q, k, v])
        if attn.backend != "triton":
            problems.append(f"backend recorded as {attn.backend!r}, expected 'triton'")
        return problems
    raise ValueError(kind)


def _child(group: str) -> None:
    import traceback

    results = {}
    for name, (kind, kw) in GROUPS[group].items():
        try:
            results[name] = _case(kind, kw)
        except Exception:
            results[name] = [traceback.format_exc(limit=6)]
    print(json.dumps(results))


# ---- the tests -----------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def verdicts():
    cache: dict[str, dict] = {}

    def get(group: str) -> dict:
        if group not in cache:
            env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
                [str(ROOT), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run([sys.executable, str(HERE), group], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            cache[group] = json.loads(proc.stdout.strip().splitlines()[-1])
        return cache[group]

    return get


@needs_triton
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_kernels_under_interpreter(verdicts, case):
    problems = verdicts("linear")[case]
    assert not problems, "\n".join(problems)


@needs_triton
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_kernel_under_interpreter(verdicts, case):
    problems = verdicts("window")[case]
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    _child(sys.argv[1])
