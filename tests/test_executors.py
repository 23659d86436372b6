"""Executors: local and subprocess agree on a tiny grid; the subprocess executor contains hangs, crashes,
SIGKILLs and floods of output inside the cell that caused them."""

import textwrap

import pytest

from cab.cells import Cell
from cab.executors import EXECUTORS, LocalExecutor, SubprocessExecutor, get_executor
from cab.grid import expand
from cab.status import Status

# Loaded only inside worker processes (never in the test process: it can segfault on purpose).
MISBEHAVING_PLUGIN = '''\
import os
import signal
import sys
import time

import cab
from cab.attention.exact import eager_attention


@cab.register_attention("exec_misbehave", patterns=("NS",), family="test", exact=True)
class Misbehave(cab.Attention):
    """Exact attention whose constructor misbehaves as `action` says."""

    def __init__(self, pattern, num_heads, head_dim, action: str = "none"):
        super().__init__(pattern, num_heads, head_dim)
        if action == "hang":  # out of reach of the soft (SIGALRM) limit: only a kill stops it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(600)
        elif action == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            print("about to exit", file=sys.stderr, flush=True)
            os._exit(7)
        elif action == "loud":
            sys.stdout.write("{" * 1_000_000 + "\\n")
            sys.stderr.write("}" * 1_000_000 + "\\n")

    def forward(self, q, k, v, key_padding_mask=None):
        return eager_attention(self, q, k, v, key_padding_mask)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "misbehave.py"
    path.write_text(MISBEHAVING_PLUGIN)
    return str(path)


def _cell(action: str) -> Cell:
    """A bench cell without correctness gate or memory pass: the attention is built straight away."""
    return Cell(kind="bench", attention="exec_misbehave", pattern="NS", hparams={"action": action}, heads=2,
                kv_heads=2, lq=16, lk=16, head_dim=8, mode="fwd",
                options={"threads": 1, "gate": False, "memory": False, "min_run_time_s": 0.01})


def test_local_and_subprocess_agree_on_a_tiny_grid(tmp_path, plugin):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: tiny
        plugins: [{plugin}]
        attentions: [exec_misbehave]
        threads: 1
        check: {{patterns: [CS]}}
        bench: {{patterns: [NS], lengths: [16], heads: 2, head_dim: 8, modes: [fwd], min_run_time_s: 0.01,
                memory: false}}
        """))
    cells = expand(config)  # loads the plugin here too: its default action is harmless
    local = list(LocalExecutor(timeout_s=60, plugins=[plugin]).run(cells))
    with get_executor("subprocess", timeout_s=60, plugins=[plugin]) as executor:
        isolated = list(executor.run(cells))
    assert [r.key for r in local] == [r.key for r in isolated] == [c.key for c in cells]
    assert [r.status for r in local] == [r.status for r in isolated] == [Status.UNSUPPORTED, Status.OK]
    assert all(r.provenance["threads"] == 1 for r in isolated)


def test_on_start_is_called_before_each_result():
    seen = []
    cells = [Cell(kind="nonsense", attention="vanilla", pattern="NS", lq=n) for n in (8, 9)]
    for result in LocalExecutor().run(cells, on_start=lambda c: seen.append(c.key)):
        assert seen[-1] == result.key
    assert seen == [c.key for c in cells]


def test_hard_timeout_kills_a_hanging_cell(plugin):
    executor = SubprocessExecutor(timeout_s=0.5, plugins=[plugin], grace_s=1.5)
    (result,) = executor.run([_cell("hang")])
    assert result.status is Status.TIMEOUT
    assert "hard time limit of 2 s" in result.message


def test_crashes_become_statuses(plugin):
    cells = [_cell("segv"), _cell("sigkill"), _cell("exit")]
    segv, killed, exited = SubprocessExecutor(timeout_s=60, plugins=[plugin]).run(cells)
    assert segv.status is Status.ERROR and "signal SIGSEGV" in segv.message
    assert "misbehave.py" in segv.message  # faulthandler's traceback names the crashing line
    assert killed.status is Status.OOM and "SIGKILL" in killed.message
    assert exited.status is Status.ERROR and "exited with status 7" in exited.message
    assert "about to exit" in exited.message  # the tail of its stderr


def test_megabytes_of_output_do_not_corrupt_the_result(plugin):
    (loud,) = SubprocessExecutor(timeout_s=60, plugins=[plugin]).run([_cell("loud")])
    assert loud.status is Status.OK, loud.message[-2000:]
    assert loud.metrics["flops"] == 2 * 2 * 16 * 16 * (8 + 8)  # 2 B H Lq Lk (Dk + Dv), B = 1
    assert loud.metrics["median_ms"] > 0
    assert "{{{{" not in loud.message and len(loud.message) < 10_000


def test_unknown_executor_suggests():
    with pytest.raises(ValueError, match="did you mean 'subprocess'"):
        get_executor("subproces")
    assert set(EXECUTORS) >= {"local", "subprocess"}
