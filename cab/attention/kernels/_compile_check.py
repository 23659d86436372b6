"""Compile every cab Triton kernel for a GPU target without a GPU (`triton.compile` down to a cubin with the
ptxas bundled in the triton wheel), so a change that the interpreter accepts but the compiler rejects is
caught on a CPU machine:

    python -m cab.attention.kernels._compile_check            # bfloat16 kernels for sm_90, ~10 s each
    python -m cab.attention.kernels._compile_check --fp32     # also the float32 (IEEE) ones, minutes each
    python -m cab.attention.kernels._compile_check --arch 80

Prints one line per kernel variant (OK with its shared memory, or FAIL with the compiler's message); the
exit status is the number of failures. It checks compilation only, not speed or results on a device.
"""

from __future__ import annotations

import argparse
import sys
import time


def variants(dtypes: "list[str]"):
    """(name, kernel, signature, constexprs) for every launch configuration cab uses."""
    from cab.attention.kernels import linear, window

    for dt in dtypes:
        p = "*" + dt
        ieee = dt == "fp32"
        for reverse, has_x, has_rs in [(False, False, True), (False, True, False), (True, True, False),
                                       (True, False, False)]:
            sig = {"Q": p, "K": p, "V": p, "QX": "*fp32", "KX": "*fp32", "LOG_DECAY": "*fp32", "OUT": p,
                   "RS": "*fp32", "L": "i32", "H": "i32", "DK": "i32", "DV": "i32"}
            consts = {"HAS_DECAY": True, "HAS_X": has_x, "HAS_RS": has_rs, "REVERSE": reverse, "IEEE": ieee,
                      "BLOCK_C": 64, "BLOCK_DK": 128, "BLOCK_E": 64}
            yield f"causal {dt} reverse={reverse} x={has_x} rowsum={has_rs}", linear._causal_kernel, sig, consts
            hs = "*fp32" if ieee else p
            sig = {"K": p, "V": p, "KX": "*fp32", "LOG_DECAY": "*fp32", "HS": hs, "XS": "*fp32", "ZS": "*fp32",
                   "L": "i32", "H": "i32", "DK": "i32", "DV": "i32", "NC": "i32"}
            state_consts = {**consts, "BLOCK_K": 64}
            del state_consts["BLOCK_DK"]
            yield (f"chunk states {dt} reverse={reverse} x={has_x} rowsum={has_rs}", linear._chunk_state_kernel, sig,
                   state_consts)
            sig = {"Q": p, "K": p, "V": p, "QX": "*fp32", "KX": "*fp32", "LOG_DECAY": "*fp32", "HS": hs, "XS": "*fp32",
                   "ZS": "*fp32", "OUT": p, "RS": "*fp32", "L": "i32", "H": "i32", "DK": "i32", "DV": "i32",
                   "NC": "i32"}
            yield f"chunk out {dt} reverse={reverse} x={has_x} rowsum={has_rs}", linear._chunk_out_kernel, sig, consts
        sig = {"A": p, "B": p, "W": "*fp32", "S": "*fp32", "Z": "*fp32", "L": "i32", "M": "i32", "N": "i32"}
        yield f"reduce {dt}", linear._reduce_kernel, sig, {"HAS_W": True, "IEEE": ieee, "BLOCK_L": 64,
                                                          "BLOCK_M": 64, "BLOCK_N": 64}
        sig = {"X": p, "S": "*fp32", "XS": "*fp32", "SV": "*fp32", "Z": "*fp32", "OUT": p, "RS": "*fp32",
               "L": "i32", "M": "i32", "N": "i32"}
        yield f"apply {dt}", linear._apply_kernel, sig, {"HAS_EXTRA": True, "HAS_RS": True, "IEEE": ieee,
                                                        "BLOCK_L": 64, "BLOCK_M": 128, "BLOCK_N": 64}
        scalars = {"H": "i32", "LQ": "i32", "LK": "i32", "D": "i32", "OFFSET": "i32", "WINDOW": "i32",
                   "SINKS": "i32", "QK_SCALE": "fp32"}
        for causal in (True, False):
            consts = {"CAUSAL": causal, "HAS_PAD": True, "IEEE": ieee, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}
            base = {"Q": p, "K": p, "V": p, "PAD": "*i8"}
            yield (f"window fwd {dt} causal={causal}", window._window_fwd_kernel,
                   {**base, "OUT": p, "LSE": "*fp32", **scalars}, consts)
            yield (f"window dk/dv {dt} causal={causal}", window._window_bwd_dkdv_kernel,
                   {**base, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p, **scalars,
                    "SM_SCALE": "fp32"}, consts)
            yield (f"window dq {dt} causal={causal}", window._window_bwd_dq_kernel,
                   {**base, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p, **scalars, "SM_SCALE": "fp32"},
                   consts)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    parser.add_argument("--fp32", action="store_true", help="also compile the float32 variants (slow)")
    args = parser.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, kernel, sig, consts in variants(["bf16"] + (["fp32"] if args.fp32 else [])):
        signature = {**sig, **{key: "constexpr" for key in consts}}
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature, consts), target=target,
                                      options={"num_warps": 4, "num_stages": 2})
            print(f"OK    {name}: {time.perf_counter() - start:.1f} s, shared memory {compiled.metadata.shared} B",
                  flush=True)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
