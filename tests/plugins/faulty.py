"""Deliberately faulty attentions, one fault each, for the fault-injection tests of the executors: each is
exact softmax attention whose forward hangs, crashes, raises, returns NaN or the wrong shape, exhausts
memory or floods its output. A plugin file: load it with `--plugin tests/plugins/faulty.py`.

Never load it into a process you care about: `faulty_segfault` kills the process that runs it, and
`faulty_memory` allocates until something stops it (at most MEMORY_CAP_BYTES, so that a test machine
survives an executor that fails to enforce its limit).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time

import torch

import cab
from cab.attention.base import repeat_kv

MEMORY_CAP_BYTES = 6 * 2**30
CHUNK_BYTES = 64 * 2**20
PRINT_BYTES = 4 * 2**20  # printed by each forward of faulty_print


def _softmax(attn: cab.Attention, q, k, v, key_padding_mask=None):
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    mask, empty = attn.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    return out if empty is None else out.masked_fill(empty, 0.0)  # rows that see no key: zeros


def _faulty(name: str):
    return cab.register_attention(f"faulty_{name}", patterns=("NS", "CS", "NC", "CC"), family="faulty", exact=True)


@_faulty("hang")
class Hang(cab.Attention):
    """Sleeps forever in Python (a soft, signal-based time limit can stop it)."""

    def forward(self, q, k, v, key_padding_mask=None):
        while True:
            time.sleep(0.05)


@_faulty("hang_blocked")
class HangBlocked(cab.Attention):
    """Blocks the alarm signal, then sleeps: only a hard kill from outside stops it."""

    def forward(self, q, k, v, key_padding_mask=None):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            time.sleep(0.05)


@_faulty("segfault")
class Segfault(cab.Attention):
    """Dereferences a null pointer."""

    def forward(self, q, k, v, key_padding_mask=None):
        ctypes.string_at(0)
        return _softmax(self, q, k, v, key_padding_mask)


@_faulty("raise")
class Raise(cab.Attention):
    """Raises an exception."""

    def forward(self, q, k, v, key_padding_mask=None):
        raise RuntimeError("faulty_raise: deliberate failure in forward")


@_faulty("exit")
class Exit(cab.Attention):
    """Calls sys.exit(0) in forward (as a script-minded plugin might): a status, never a silent exit of cab."""

    def forward(self, q, k, v, key_padding_mask=None):
        sys.exit(0)


@_faulty("nan")
class NaN(cab.Attention):
    """Returns NaN everywhere."""

    def forward(self, q, k, v, key_padding_mask=None):
        return torch.full_like(_softmax(self, q, k, v, key_padding_mask), float("nan"))


@_faulty("wrong_shape")
class WrongShape(cab.Attention):
    """Drops the last query row."""

    def forward(self, q, k, v, key_padding_mask=None):
        return _softmax(self, q, k, v, key_padding_mask)[..., :-1, :]


@_faulty("memory")
class Memory(cab.Attention):
    """Allocates and touches memory in 64 MiB chunks, up to MEMORY_CAP_BYTES, then waits to be stopped."""

    def forward(self, q, k, v, key_padding_mask=None):
        hoard = [torch.ones(CHUNK_BYTES // 4) for _ in range(MEMORY_CAP_BYTES // CHUNK_BYTES)]
        while hoard:
            time.sleep(0.05)


@_faulty("print")
class Print(cab.Attention):
    """Correct, but prints 4 MiB on every call."""

    def forward(self, q, k, v, key_padding_mask=None):
        sys.stdout.write("x" * (PRINT_BYTES - 1) + "\n")
        return _softmax(self, q, k, v, key_padding_mask)
