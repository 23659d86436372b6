"""Executors: local and subprocess agree on a tiny grid; what a cell process that leaves no result becomes;
the isolated cell sees the submitter's device variables and never reruns the driver's script; options.
The fault-injection matrix (hangs, segfaults, memory, output floods...) is in test_faults.py."""

import subprocess
import sys
import textwrap

import pytest

from cab.cells import Cell
from cab.executors import EXECUTORS, accepted_options, get_executor
from cab.executors.local import LocalExecutor
from cab.executors.subprocess import SubprocessExecutor
from cab.grid import expand
from cab.status import Status

# Loaded only inside worker processes (never in the test process: it can segfault on purpose).
MISBEHAVING_PLUGIN = '''\
import os
import signal
import sys

import cab
from cab.attention.engine.scores import masked_softmax_attention


@cab.register_attention("exec_misbehave", patterns=("NS",), family="test", exact=True)
class Misbehave(cab.Attention):
    """Exact attention whose constructor misbehaves as `action` says."""

    def __init__(self, pattern, num_heads, head_dim, action: str = "none"):
        super().__init__(pattern, num_heads, head_dim)
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            print("about to exit", file=sys.stderr, flush=True)
            os._exit(7)
        elif action == "show_env":
            raise RuntimeError(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")

    def forward(self, q, k, v, key_padding_mask=None):
        return masked_softmax_attention(self, q, k, v, key_padding_mask)
'''


@pytest.fixture(scope="module")
def plugin(write_plugin):
    return write_plugin("plugins", "misbehave.py", MISBEHAVING_PLUGIN)


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


@pytest.mark.parametrize("kind", ["subprocess", "pool"])
def test_signals_and_exits_without_a_result_become_statuses(plugin, kind):
    executor = get_executor(kind, timeout_s=60, plugins=[plugin], workers=1)
    with executor:
        killed, exited = sorted(executor.run([_cell("sigkill"), _cell("exit")]),
                                key=lambda r: r.cell.hparams["action"] != "sigkill")
    # a SIGKILL cab did not send, at a few hundred MiB, while the kernel's OOM killer killed nothing: not `oom`
    assert killed.status is Status.ERROR and "killed by SIGKILL from outside cab" in killed.message, killed.message
    assert "oom_kill did not change" in killed.message or "cannot be told" in killed.message
    assert exited.status is Status.ERROR and "exited with status 7" in exited.message
    assert "about to exit" in exited.message  # the tail of its stderr


def test_a_sigkill_is_oom_only_with_evidence(monkeypatch):
    from cab.executors import subprocess as isolated

    limits = isolated.Limits(memory_limit_bytes=1000 * isolated.MiB)
    far, near = 273 * isolated.MiB, 950 * isolated.MiB
    monkeypatch.setattr(isolated, "oom_kills", lambda: 12)
    for at_start, rss, status, fragment in [
            (12, far, Status.ERROR, "oom_kill did not change; 273 MiB resident when last seen"),
            (10, far, Status.OOM, "oom_kill rose by 2 during the cell"),
            (12, near, Status.OOM, "near the memory limit of 1,000 MiB"),
            (None, far, Status.ERROR, "cannot be told")]:
        watch = isolated._Watch(last_rss_bytes=rss, peak_rss_bytes=rss, oom_kills_at_start=at_start)
        status_seen, message, _ = isolated._failure(-9, watch, limits, "")
        assert status_seen is status and fragment in message, message


def test_the_cell_sees_the_submitters_device_visibility(plugin, monkeypatch):
    """The forkserver keeps the environment it started with; a cell must see the submitter's value at
    submission (Ray assigns a GPU per task through CUDA_VISIBLE_DEVICES)."""
    executor = SubprocessExecutor(timeout_s=60, plugins=[plugin])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (unset,) = executor.run([_cell("show_env")])  # starts the server if no test did
    assert unset.status is Status.ERROR and "CUDA_VISIBLE_DEVICES=None" in unset.message
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    (shown,) = executor.run([_cell("show_env")])
    assert "CUDA_VISIBLE_DEVICES=7" in shown.message


def test_a_driver_script_is_not_rerun_in_cells(tmp_path, plugin):
    """A driver script without a __main__ guard must not run again inside each isolated cell."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""\
        from cab.cells import Cell
        from cab.executors.subprocess import SubprocessExecutor
        with open({str(marker)!r}, "a") as f:
            f.write("driver\\n")
        cell = Cell(kind="bench", attention="exec_misbehave", pattern="NS", heads=2, kv_heads=2, lq=16, lk=16,
                    head_dim=8, mode="fwd", options={{"threads": 1, "gate": False, "memory": False,
                                                      "min_run_time_s": 0.01}})
        (result,) = SubprocessExecutor(timeout_s=60, plugins=[{plugin!r}]).run([cell])
        print(result.status.value)
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    assert marker.read_text().split() == ["driver"]


def test_get_executor_passes_the_options_each_kind_takes():
    sub = get_executor("subprocess", timeout_s=5, memory_limit_bytes=2**30, address="ignored", grace_s=2)
    assert (sub.limits.memory_limit_bytes, sub.limits.hard_limit_s) == (2**30, 7)
    assert isinstance(get_executor("local", memory_limit_bytes=2**30), LocalExecutor)
    assert get_executor("ray", address="auto").address == "auto"  # connects only when it runs
    assert accepted_options("local") == set() and "address" not in accepted_options("subprocess")


def test_unknown_executor_suggests():
    with pytest.raises(ValueError, match="did you mean 'subprocess'"):
        get_executor("subproces")
    assert set(EXECUTORS) >= {"local", "subprocess", "ray"}


def _tqdm_lock_kind(conn) -> None:
    """In a forkserver child: build a (disabled) bar as inductor does while compiling; report tqdm's lock."""
    from tqdm import tqdm
    from tqdm.std import TqdmDefaultWriteLock

    tqdm(total=1, disable=True).close()
    conn.send((type(tqdm.get_lock()).__name__, getattr(TqdmDefaultWriteLock, "mp_lock", None) is None))
    conn.close()


def test_forkserver_children_make_no_multiprocessing_lock_for_tqdm():
    """A cell process ends with os._exit or a kill: a semaphore it registered with multiprocessing's resource
    tracker would be reported leaked when the driver exits (seen after FlexAttention's check cell)."""
    import multiprocessing

    from cab.executors import forkserver

    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = forkserver.start(_tqdm_lock_kind, (sender,), name="cab-test-tqdm-lock")
    sender.close()
    assert receiver.poll(60)
    lock, no_mp_lock = receiver.recv()
    child.join(30)
    assert no_mp_lock and lock != "TqdmDefaultWriteLock", lock
