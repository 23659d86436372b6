"""Conformance (every built-in passing its patterns: tests/attention/test_every_attention.py): each
deliberately broken attention of tests/plugins/broken.py is flagged by the right check with the right status;
failures inside checks are results; time limits, the gate, the runner entry point and the verdict table."""

import json

import pytest
import torch

import cab
from cab import registry
from cab.attention.base import repeat_kv
from cab.cells import Cell
from cab.check import (
    CheckOutcome,
    ConformanceReport,
    check_cell,
    eager_attention,
    gate,
    run_conformance,
    verdict_table,
)
from cab.failures import CellTimeout, time_limit
from cab.runner import run_cell
from cab.status import Status
from tests.paths import PLUGINS

BROKEN = PLUGINS / "broken.py"
PATTERNS = ("NS", "CS", "NC", "CC")


@pytest.fixture(scope="module", autouse=True)
def broken_plugin():
    errors = registry.load_plugin(str(BROKEN))
    assert errors == [], errors


def _check(report: ConformanceReport, name: str) -> CheckOutcome:
    return next(c for c in report.checks if c.name == name)


def _assert_flagged(report: ConformanceReport, check: str, status: Status) -> None:
    """The verdict is `status`, decided by `check`, and every check before it passed."""
    assert report.status is status, report.checks
    decided = report.deciding_check
    assert decided is not None and decided.name == check, report.checks
    earlier = report.checks[: report.checks.index(decided)]
    assert all(c.status is Status.OK for c in earlier), earlier


# the broken plugins: each flagged by the right check ------------------------------------------------

FLAGGED = [
    # (attention, pattern, hparams, deciding check, status, text in that check's message)
    ("broken_causal_leak", "CS", {}, "causal_prefix", Status.INCORRECT, "float64"),
    ("broken_query_leak", "CC", {}, "query_causal", Status.INCORRECT, "float64"),
    ("broken_ignores_padding", "NS", {}, "key_padding", Status.INCORRECT, "padded"),
    ("broken_ignores_padding", "NC", {}, "key_padding", Status.INCORRECT, "padded"),
    ("broken_raises", "NS", {}, "forward", Status.ERROR, "deliberate failure inside forward"),
    ("broken_nan", "NC", {}, "finite", Status.INCORRECT, "non-finite outputs"),
    ("broken_wrong_shape", "CS", {}, "shape_dtype", Status.INCORRECT, "(2, 4, 48, 31)"),
    ("broken_noncausal", "CS", {}, "causal_prefix", Status.INCORRECT, "prefix"),
    ("broken_detached", "NC", {}, "backward", Status.INCORRECT, "no gradient reaches v"),
    ("broken_uninitialised", "NS", {}, "finite", Status.INCORRECT, "poisoned by NaN"),
    ("broken_bad_reference", "NC", {}, "reference", Status.INCORRECT, "reference()"),
    ("broken_wrong_scale", "NS", {}, "exact_oracle", Status.INCORRECT, "float64 oracle"),
    ("broken_accepts_undeclared", "CS", {}, "undeclared_pattern", Status.INCORRECT, "undeclared pattern accepted"),
    ("broken_oom", "CC", {}, "forward", Status.OOM, "out of memory"),
]


@pytest.mark.parametrize("name,pattern,hparams,check,status,text", FLAGGED, ids=[f"{f[0]}-{f[1]}" for f in FLAGGED])
def test_broken_attention_is_flagged_for_the_right_reason(name, pattern, hparams, check, status, text):
    report = run_conformance(name, pattern, hparams=hparams)
    _assert_flagged(report, check, status)
    assert text in _check(report, check).message
    assert report.message.startswith(f"{check}: ")


def test_a_1e3_future_leak_is_caught_with_margin_by_prefix_and_gradient():
    report = run_conformance("broken_causal_leak", "CS")
    for name in ("causal_prefix", "causal_grad"):
        outcome = _check(report, name)
        assert outcome.status is Status.INCORRECT
        assert outcome.error > 1e-4 > 100 * outcome.tolerance  # the leak is ~1e-3 relative, float64 tolerance
    assert report.deciding_check.name == "causal_prefix"


def test_a_1e3_query_leak_fails_removal_perturbation_and_gradient():
    report = run_conformance("broken_query_leak", "CC")
    outcome = _check(report, "query_causal")
    assert outcome.status is Status.INCORRECT and outcome.error > 1e-4
    # the same leak shows on every odd shape through the perturbation probe
    assert "perturbed" in _check(report, "odd_shapes").message


def test_leaks_are_caught_in_float32_when_float64_is_unsupported():
    report = run_conformance("broken_causal_leak", "CS", hparams={"float64": False})
    prefix = _check(report, "causal_prefix")
    assert prefix.status is Status.INCORRECT
    assert prefix.tolerance == pytest.approx(1e-4) and prefix.error > prefix.tolerance
    assert "float64 unsupported (TypeError: this kernel has no float64 variant)" in prefix.message
    assert "compared in float32" in prefix.message
    assert report.coverage["dtypes"]["structural"] == "float32"
    assert "float64 unsupported" in report.coverage["structural_fallback"]


def test_uninitialised_output_is_caught_on_every_odd_shape_too():
    report = run_conformance("broken_uninitialised", "CC")
    odd = _check(report, "odd_shapes")
    assert odd.status is Status.INCORRECT
    assert odd.message.count("poisoned by NaN") == 3  # length 37x63, head dim 60, GQA 4/2


# failures inside checks are results ----------------------------------------------------------------


def test_a_crash_in_forward_skips_the_dependent_checks():
    report = run_conformance("broken_raises", "CS")
    assert _check(report, "forward").message == "RuntimeError: deliberate failure inside forward"
    rest = report.checks[1:]
    assert rest and all(c.status is Status.SKIPPED and "forward failed" in c.message for c in rest)


def test_a_crash_inside_a_later_check_is_that_checks_error():
    report = run_conformance("broken_block_size", "NC")
    assert [c.status for c in report.checks[:4]] == [Status.OK] * 4  # 48 x 32 is a multiple of 16
    odd = _check(report, "odd_shapes")
    assert odd.status is Status.ERROR
    assert "length 37x63" in odd.message and "lengths must be multiples of 16" in odd.message
    assert report.status is Status.ERROR


def test_cell_timeout_propagates_out_of_the_checks():
    with pytest.raises(CellTimeout):
        with time_limit(0.2):
            run_conformance("broken_slow", "NS", hparams={"seconds": 5.0})


def test_runner_turns_a_hanging_check_cell_into_timeout():
    cell = Cell(kind="check", attention="broken_slow", pattern="NS", hparams={"seconds": 5.0})
    assert run_cell(cell, timeout_s=0.2).status is Status.TIMEOUT


# patterns an attention does not declare, unavailable attentions --------------------------------------


@pytest.fixture
def scratch():
    """Register correct test-only attentions; unregister them afterwards."""
    names = []

    def define(name, cls, **kw):
        cab.register_attention(name, family="test", exact=False, **kw)(cls)
        names.append(name)

    yield define
    for name in names:
        registry.unregister_attention(name)


class _Eager(cab.Attention):
    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return eager_attention(q, k, v, self.pattern, key_padding_mask)


def test_undeclared_pattern_is_unsupported_with_the_reason(scratch):
    scratch("scratch_ns_only", type("NSOnly", (_Eager,), {}), patterns=("NS",), gqa=False,
            unsupported={"CS": "pools over every query"})
    report = run_conformance("scratch_ns_only", "CS")
    assert report.status is Status.UNSUPPORTED
    assert [c.name for c in report.checks] == ["undeclared_pattern"]
    assert "scratch_ns_only" in report.message and "CS" in report.message and "pools over every query" in report.message
    ok = run_conformance("scratch_ns_only", "NS")
    assert ok.status is Status.OK
    assert "grouped-query heads not declared" in _check(ok, "odd_shapes").message


def test_unsupported_pattern_error_must_name_attention_and_pattern(scratch):
    class Anonymous(_Eager):
        def __init__(self, pattern, num_heads, head_dim):
            if cab.Pattern.parse(pattern) is not cab.Pattern.NS:
                raise cab.UnsupportedPattern("some attention", cab.Pattern.NS, ())
            super().__init__(pattern, num_heads, head_dim)

    scratch("scratch_anonymous", Anonymous, patterns=("NS",))
    report = run_conformance("scratch_anonymous", "NC")
    _assert_flagged(report, "undeclared_pattern", Status.INCORRECT)
    assert "does not name the attention and the pattern" in report.message


def test_unavailable_attention_is_unsupported_with_its_reason(scratch):
    class NeedsPackage(_Eager):
        @classmethod
        def unavailable_reason(cls, device):
            return "needs the package 'fancykernels'"

    scratch("scratch_unavailable", NeedsPackage)
    report = run_conformance("scratch_unavailable", "NS")
    assert report.status is Status.UNSUPPORTED and report.message == "needs the package 'fancykernels'"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the verdict on a machine without CUDA")
def test_missing_device_is_unsupported():
    report = run_conformance("vanilla", "NS", device="cuda")
    assert report.status is Status.UNSUPPORTED and "CUDA is not available" in report.message


def test_a_mechanism_ignoring_queries_and_keys_passes_backward_with_a_note(scratch):
    class ValueMean(_Eager):
        """Uniform weights over the visible keys: the output depends on v only (like a state space layer)."""

        def forward(self, q, k, v, key_padding_mask=None):
            zeros = torch.zeros_like(q)
            return eager_attention(zeros, torch.zeros_like(k), v, self.pattern, key_padding_mask)

    scratch("scratch_value_mean", ValueMean, patterns=("NS",))
    report = run_conformance("scratch_value_mean", "NS")
    assert report.status is Status.OK, report.message
    assert "the output does not depend on q, k" in _check(report, "backward").message


# randomness: the module is built once and every call is reseeded ------------------------------------


class _RandomFeatures(cab.Attention):
    """Positive random-feature linear attention (Performer's FAVOR+ map), features redrawn in every call:
    passes only because conformance reseeds before each forward. Its unstabilised exponential feature map
    overflows at large scores, so it declares the largest it takes."""

    max_logit = 10.0

    def __init__(self, pattern, num_heads, head_dim, features: int = 16):
        super().__init__(pattern, num_heads, head_dim)
        self.features = features

    def _phi(self, x, omega):
        x = x * x.shape[-1] ** -0.25
        return torch.exp(x @ omega - (x * x).sum(-1, keepdim=True) / 2) / self.features ** 0.5

    def forward(self, q, k, v, key_padding_mask=None):
        dtype = q.dtype
        omega = torch.randn(q.shape[-1], self.features, dtype=dtype, device=q.device).double()
        q, k, v = q.double(), k.double(), v.double()  # features in float64: no underflow to a zero normaliser
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        pq, pk = self._phi(q, omega), self._phi(k, omega)
        if key_padding_mask is not None:
            pk = pk.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        if self.causal:
            state = torch.cumsum(pk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # (B, H, L, m, Dv)
            num = (pq.unsqueeze(-2) @ state).squeeze(-2)
            den = (pq * torch.cumsum(pk, dim=-2)).sum(-1, keepdim=True)
        else:
            num, den = pq @ (pk.transpose(-1, -2) @ v), pq @ pk.sum(-2).unsqueeze(-1)
        safe = torch.where(den > 0, den, torch.ones_like(den))  # a row that sees no key: 0, finite gradients
        return torch.where(den > 0, num / safe, torch.zeros((), dtype=num.dtype)).to(dtype)


def test_random_feature_attention_passes_because_randomness_is_fixed(scratch):
    scratch("scratch_random_features", _RandomFeatures, patterns=("NS", "CS"))
    for pattern in ("NS", "CS"):
        report = run_conformance("scratch_random_features", pattern, seed=3)
        assert report.status is Status.OK, report.message


def test_the_callers_random_state_and_thread_count_are_restored():
    torch.manual_seed(1234)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    run_conformance("vanilla", "NC")
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


# the entry points: check_cell, gate, metrics, the verdict table -------------------------------------


def test_check_cell_through_the_runner():
    cell = Cell(kind="check", attention="sdpa", pattern="CC", dtype="float32", seed=1)
    result = run_cell(cell)
    assert result.status is Status.OK and result.message.startswith("all ")
    assert result.metrics["verdict"] == "ok"
    assert {c["name"] for c in result.metrics["checks"]} >= {"forward", "query_causal", "exact_oracle"}
    outcome = check_cell(Cell(kind="check", attention="broken_noncausal", pattern="CS"))
    assert outcome.status is Status.INCORRECT and outcome.message.startswith("causal_prefix: ")


def test_gate_is_cached_per_configuration():
    first = gate("vanilla", "NC", None, "cpu", "float32")
    assert gate("vanilla", cab.Pattern.NC, {}, "cpu", "float32") is first
    assert first.status is Status.OK
    failing = gate("broken_wrong_scale", "NC", None, "cpu", "float32")
    assert failing is not first and failing.status is Status.INCORRECT


def test_metrics_are_strict_json_even_for_nan_outputs():
    report = run_conformance("broken_nan", "NS")
    metrics = report.to_metrics()
    decoded = json.loads(json.dumps(metrics, allow_nan=False))
    assert decoded["verdict"] == "incorrect"
    padding = next(c for c in decoded["checks"] if c["name"] == "key_padding")
    assert padding["status"] == "incorrect" and padding["error"] is None and "non-finite" in padding["message"]


def test_verdict_table_has_one_row_per_report_with_the_failing_check():
    reports = [run_conformance("vanilla", "CS"), run_conformance("broken_query_leak", "CC"),
               run_conformance("broken_query_leak", "NS"), run_conformance("broken_raises", "NC")]
    lines = verdict_table(reports).splitlines()
    header = lines[0].split()
    assert header[:6] == ["attention", "pattern", "status", "check", "error", "tolerance"]
    rows = lines[2:6]
    assert rows[0].split()[:4] == ["vanilla", "CS", "ok", "-"]
    assert rows[1].split()[:4] == ["broken_query_leak", "CC", "incorrect", "query_causal"]
    assert rows[2].split()[:4] == ["broken_query_leak", "NS", "unsupported", "undeclared_pattern"]
    assert rows[3].split()[:4] == ["broken_raises", "NC", "error", "forward"]
    assert "deliberate failure inside forward" in rows[3]
    assert "4 verdict(s): 1 error, 1 incorrect, 1 ok, 1 unsupported" in lines
    text = verdict_table(reports)
    assert "broken_query_leak CC: incorrect" in text and "  - query_causal: incorrect [relative error" in text
    assert "not run: reference (the attention has no reference())" in text  # vanilla's coverage
    assert "dtypes: structural checks in float64, again in float32" in text
    assert verdict_table([]) == "no conformance reports"


# segments: packed variable-length sequences -------------------------------------------------------


class _SegmentLabels(_Eager):
    """Masks by equal segment *labels*, not runs: the recurring id of the segments check joins two
    separate segments, a cross-segment leak."""

    supports_segments = True

    def forward(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        out_all = eager_attention(q, k, v, self.pattern, key_padding_mask)
        if segment_ids is None:
            return out_all
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask = cab.patterns.attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask) & same
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


class _SegmentsIgnored(_Eager):
    supports_segments = True

    def forward(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        return eager_attention(q, k, v, self.pattern, key_padding_mask)


@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_segments_check_runs_only_for_attentions_declaring_support(pattern):
    assert "segments" in [c.name for c in run_conformance("vanilla", pattern).checks]
    assert "segments" not in [c.name for c in run_conformance("memory_efficient", pattern).checks]
    assert "segments" not in [c.name for c in run_conformance("vanilla", "NC").checks]


@pytest.mark.parametrize("cls", [_SegmentLabels, _SegmentsIgnored])
@pytest.mark.parametrize("pattern", ["NS", "CS"])
def test_segments_check_catches_cross_segment_leaks(scratch, cls, pattern):
    scratch("scratch_segments", cls, patterns=("NS", "CS"))
    report = run_conformance("scratch_segments", pattern)
    _assert_flagged(report, "segments", Status.INCORRECT)
    outcome = _check(report, "segments")
    assert ("outside that segment" in outcome.message or "packed vs run alone" in outcome.message)
    assert outcome.error > 1e-3
