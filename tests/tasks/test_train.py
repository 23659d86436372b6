"""Training cells: the schedule, learning beyond chance, seeds, the correctness gate, unsupported
combinations, divergence, interruption, and the metrics a task cell reports."""

import math

import pytest
import torch

from cab import Attention, register_attention
from cab.attention.base import repeat_kv
from cab.patterns import Pattern
from cab.registry import unregister_attention
from cab.status import Status
from cab.tasks import Metric, Task, create_task
from cab.training.cell_kind import run_task, slot_attentions
from cab.training.loop import Diverged, learning_rate, train

# a recall problem a tiny model learns in about a hundred steps (one-hop lookup of jointly bound pairs)
EASY_RECALL = {"length": 24, "pairs": [2, 4], "key_vocab": 8, "value_vocab": 8, "binding": "joint",
               "d_model": 32, "heads": 2, "layers": 2, "steps": 150, "batch_size": 16, "lr": 3e-3,
               "eval_examples": 64}
TINY = {**EASY_RECALL, "steps": 4, "d_model": 16, "eval_examples": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rate_warms_up_then_decays_to_zero():
    rates = [learning_rate(step, 100, 1.0, 0.1) for step in range(100)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert learning_rate(100, 100, 1.0, 0.1) == pytest.approx(0.0)
    assert learning_rate(0, 10, 2.0, 0.0) == pytest.approx(2.0)


def test_a_tiny_model_learns_recall_far_beyond_chance():
    outcome = run_task("recall", "sdpa", "CS", params=EASY_RECALL, seed=0, gate=False)
    assert outcome.status is Status.OK, outcome.message
    metrics = outcome.metrics
    chance = metrics["chance"]["accuracy"]
    assert chance == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert metrics["accuracy"] > chance + 0.4
    assert [p["pairs"] for p in metrics["accuracy_by_pairs"]] == [2, 4]
    assert metrics["loss_curve"][-1]["loss"] < 0.5 * metrics["loss_curve"][0]["loss"]
    assert metrics["steps"] == 150 and metrics["loss_curve"][-1]["step"] == 150
    assert metrics["params_attention"] == 0 and metrics["params_total"] == metrics["params_backbone"] > 0
    assert metrics["param_flag"] is False and metrics["train_s"] > 0 and metrics["eval_s"] > 0


def test_seeds_reproduce_and_differ():
    first = run_task("recall", "vanilla", "NS", params=TINY, seed=3, gate=False).metrics
    again = run_task("recall", "vanilla", "NS", params=TINY, seed=3, gate=False).metrics
    other = run_task("recall", "vanilla", "NS", params=TINY, seed=4, gate=False).metrics
    assert first["loss_curve"] == again["loss_curve"] and first["accuracy"] == again["accuracy"]
    assert first["loss_curve"] != other["loss_curve"]


def test_the_tested_attention_fills_only_its_pattern_and_is_counted():
    task = create_task("lookup", {"d_model": 16, "heads": 2, "layers": 1, "steps": 3, "source_length": 16,
                                  "pairs": 4, "queries": 4, "eval_examples": 4})
    model = task.build_model(Pattern.CC, task.slots("abc", "CC", {"num_slots": 4}))
    assert slot_attentions(model) == [("sdpa", Pattern.NS, False), ("sdpa", Pattern.CS, False),
                                      ("abc", Pattern.CC, True)]
    outcome = run_task(task, "abc", "CC", hparams={"num_slots": 4}, gate=False)
    assert outcome.status is Status.OK
    assert outcome.metrics["params_attention"] > 0
    assert outcome.metrics["param_overhead"] == pytest.approx(
        outcome.metrics["params_attention"] / outcome.metrics["params_backbone"])


@pytest.mark.parametrize("task, attention, pattern, reason", [
    ("recall", "sdpa", "NC", "exercises"),          # the task has no NC slot
    ("forecast", "local", "NC", "does not support"),  # local attention declares no cross pattern
    ("recall", "flash", "CS", "CUDA"),               # not available on this device
])
def test_unsupported_combinations(task, attention, pattern, reason):
    if attention == "flash" and torch.cuda.is_available():
        pytest.skip("flash runs on this machine")
    outcome = run_task(task, attention, pattern, params={"steps": 1}, gate=False)
    assert outcome.status is Status.UNSUPPORTED and reason in outcome.message


def test_training_dtype_other_than_float32_is_unsupported():
    outcome = run_task("recall", "sdpa", "CS", params=TINY, dtype="bfloat16")
    assert outcome.status is Status.UNSUPPORTED and "float32" in outcome.message


@pytest.fixture
def leaking_attention():
    @register_attention("train_test_leak", patterns=("CS",), family="test", exact=False)
    class Leak(Attention):
        """Declares causal self attention but attends to every key (future included)."""

        def __init__(self, pattern, num_heads, head_dim):
            super().__init__(pattern, num_heads, head_dim)

        def forward(self, q, k, v, key_padding_mask=None):
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    yield "train_test_leak"
    unregister_attention("train_test_leak")


def test_the_gate_refuses_a_leaking_attention(leaking_attention):
    outcome = run_task("recall", leaking_attention, "CS", params=TINY, gate=True)
    assert outcome.status is Status.INCORRECT
    assert "correctness gate failed for the attention under test" in outcome.message
    assert outcome.metrics["gate_attention"] == leaking_attention
    assert run_task("recall", leaking_attention, "CS", params=TINY, gate=False).status is Status.OK


def test_the_gate_probes_the_shapes_the_task_calls_its_attention_with():
    outcome = run_task("recall", "vanilla", "CS", params=TINY, gate=True)
    assert outcome.status is Status.OK and outcome.metrics["gate"] == "ok"
    # TINY: d_model 16 over 2 heads, batch 16, 24 tokens: the attention is called at exactly that shape
    assert outcome.metrics["gate_shapes"] == {"vanilla CS": ["B=16 Hq=2 Hkv=2 Lq=24 Lk=24 D=8"]}


@pytest.fixture
def long_path_leak():
    @register_attention("train_test_long_leak", patterns=("CS",), family="test", exact=False)
    class LongLeak(Attention):
        """Causal, except that for sequences of exactly 24 tokens (the task's length, never a suite shape)
        every row also sees the next key."""

        def __init__(self, pattern, num_heads, head_dim):
            super().__init__(pattern, num_heads, head_dim)

        def forward(self, q, k, v, key_padding_mask=None):
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
            lq, lk = q.shape[-2], k.shape[-2]
            ahead = 1 if lq == 24 else 0
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + ahead
            if key_padding_mask is not None:
                visible = visible[None, None] & ~key_padding_mask[:, None, None, :]
            seen = visible.any(dim=-1, keepdim=True)
            scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1)
            return torch.where(seen, probs @ v, torch.zeros((), dtype=v.dtype))

    yield "train_test_long_leak"
    unregister_attention("train_test_long_leak")


def test_the_gate_refuses_a_flaw_only_the_tasks_shape_shows(long_path_leak):
    outcome = run_task("recall", long_path_leak, "CS", params=TINY, gate=True)
    assert outcome.status is Status.INCORRECT, outcome.message
    assert "published" in outcome.message and "Lq=24" in str(outcome.metrics["gate_coverage"])


class Constant(Task):
    """A one-parameter regression whose loss can be made to misbehave at a chosen step."""

    name = "test_constant"
    backbones = {Pattern.NS: "none"}
    metrics = (Metric("error", False, "distance to the target"),)

    def __init__(self, params=None, fail_at=None, failure=None):
        super().__init__(params or {"steps": 6})
        self.fail_at, self.failure, self.calls = fail_at, failure, 0

    def lengths(self, pattern):
        return 1, 1

    def prepare(self):
        return {"target": torch.tensor(3.0)}

    def build_model(self, pattern, slots):
        return torch.nn.Linear(1, 1)

    def batch(self, data, generator, device):
        self.calls += 1
        if self.calls - 1 == self.fail_at and self.failure is KeyboardInterrupt:
            raise KeyboardInterrupt
        return torch.ones(4, 1)

    def loss(self, model, batch):
        loss = ((model(batch) - 3.0) ** 2).mean()
        return loss * float("nan") if self.calls - 1 == self.fail_at and self.failure == "nan" else loss

    def evaluate(self, model, data, device):
        return {"error": float((model(torch.ones(1, 1)) - data["target"]).abs())}

    def chance(self, data):
        return {"error": 3.0}


def test_a_diverging_run_is_an_error_with_the_step():
    outcome = run_task(Constant(fail_at=2, failure="nan"), "sdpa", "NS", gate=False)
    assert outcome.status is Status.ERROR and "diverged" in outcome.message
    assert outcome.metrics["diverged_at_step"] == 2
    with pytest.raises(Diverged):
        task = Constant(fail_at=0, failure="nan")
        train(task, task.build_model(Pattern.NS, None), task.prepare(), torch.Generator(), torch.device("cpu"),
              progress=False)


def test_ctrl_c_stops_training_and_propagates():
    task = Constant(fail_at=3, failure=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_task(task, "sdpa", "NS", gate=False, progress=True)
    assert task.calls == 4

