"""Task cells in the grid: a `tasks` section expands into task x pattern x attention x seed cells with stable
keys and located errors, runs through the runner into the store, and resumes without retraining."""

import textwrap

import pytest

from cab.cells import Cell
from cab.status import Status
from tests.paths import ROOT

TINY = "{steps: 3, batch_size: 4, d_model: 16, heads: 2, layers: 1, eval_batch_size: 8}"

GRID = f"""\
name: tasks-grid
attentions: [vanilla, local, nystromformer]
patterns: [NS, CS, NC, CC]
threads: 1
seed: 5
tasks:
  seeds: 2
  params: {TINY}
  attention_hparams:
    local: {{window: 3}}
  tasks:
    - name: recall
      params: {{length: 16, pairs: [2], key_vocab: 4, value_vocab: 4, eval_examples: 4}}
    - name: forecast
      label: short forecast
      params: {{history: 12, horizon: 6, eval_windows: 3}}
"""

def write(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


def test_expansion_crosses_patterns_with_the_attentions_that_declare_them(tmp_path):
    from cab.grid import expand

    cells = expand(write(tmp_path, GRID))
    layout = [(c.task, c.pattern, c.attention, c.seed) for c in cells]
    expected = [("recall", "CS", a, s) for a in ("vanilla", "local") for s in (5, 6)]
    expected += [("recall", "NS", a, s) for a in ("vanilla", "local", "nystromformer") for s in (5, 6)]
    expected += [("forecast", "NC", a, s) for a in ("vanilla", "nystromformer") for s in (5, 6)]
    expected += [("forecast", "CC", "vanilla", s) for s in (5, 6)]
    assert layout == expected
    recall = cells[0]
    assert recall.kind == "task" and recall.mode == "train" and recall.dtype == "float32"
    assert recall.task_params["steps"] == 3 and recall.task_params["pairs"] == [2]
    assert recall.task_params["binding"] == "adjacent" and recall.task_params["base_attention"] == "sdpa"
    assert (recall.lq, recall.lk, recall.batch, recall.heads, recall.head_dim) == (16, 16, 4, 2, 8)
    local = next(c for c in cells if c.attention == "local")
    assert local.hparams == {"window": 3} and local.label == "local(window=3)"
    forecast = next(c for c in cells if c.task == "forecast")
    assert (forecast.lq, forecast.lk) == (6, 12) and forecast.options["task_label"] == "short forecast"
    assert recall.options == {"threads": 1, "gate": True, "progress": True, "task_label": "recall"}
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys) and keys == [c.key for c in expand(write(tmp_path, GRID))]


def test_cells_without_a_task_keep_their_keys():
    cell = Cell(kind="bench", attention="vanilla", pattern="CS", mode="fwd")
    assert "task" not in cell.identity() and "task_params" not in cell.identity()
    with_task = Cell(kind="task", attention="vanilla", pattern="CS", task="lm", task_params={"steps": 1})
    assert with_task.identity()["task"] == "lm"
    assert with_task.key != Cell(kind="task", attention="vanilla", pattern="CS", task="lm",
                                 task_params={"steps": 2}).key


def test_all_tasks_and_pattern_filters(tmp_path):
    from cab.grid import expand
    from cab.tasks import task_names

    cells = expand(write(tmp_path, """\
        name: every-task
        attentions: [sdpa]
        patterns: [CS, CC]
        tasks:
          tasks: all
        """))
    assert sorted({c.task for c in cells}) == sorted(n for n in task_names() if n not in ("listops", "lra_text",
                                                                                          "lra_retrieval"))
    assert {c.pattern for c in cells} == {"CS", "CC"}
    narrowed = expand(write(tmp_path, """\
        name: one-pattern
        attentions: [sdpa]
        tasks:
          tasks: [{name: lookup, patterns: [CC]}]
        """))
    assert [(c.task, c.pattern) for c in narrowed] == [("lookup", "CC")]


def test_a_sweep_is_a_list_of_entries_and_an_entry_can_narrow_the_attentions(tmp_path):
    from cab.grid import expand

    cells = expand(write(tmp_path, """\
        name: width-sweep
        attentions: [sdpa, no_mixing, {name: local, hparams: {window: 3}}, {name: local, hparams: {window: 5}}]
        patterns: [CS]
        tasks:
          params: {steps: 3, layers: 1, heads: 2}
          tasks:
            - {name: recall, label: d16, params: {length: 16, pairs: [2], d_model: 16, lr: 0.01}}
            - {name: recall, label: d32, params: {length: 16, pairs: [2], d_model: 32, lr: 0.003},
               attentions: [sdpa, local]}
        """))
    layout = [(c.options["task_label"], c.display_name, c.task_params["d_model"], c.task_params["lr"], c.head_dim)
              for c in cells]
    assert layout == [("d16", "sdpa", 16, 0.01, 8), ("d16", "no_mixing", 16, 0.01, 8),
                      ("d16", "local(window=3)", 16, 0.01, 8), ("d16", "local(window=5)", 16, 0.01, 8),
                      ("d32", "sdpa", 32, 0.003, 16), ("d32", "local(window=3)", 32, 0.003, 16),
                      ("d32", "local(window=5)", 32, 0.003, 16)]
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.parametrize("entry, key, message", [
    ("{name: recall, attentions: [sdpa, local]}", "tasks.tasks[0].attentions[1]", "not one of the section's"),
    ("{name: recall, attentions: [sdpa, lokal]}", "tasks.tasks[0].attentions[1]", "not one of the section's"),
    ("{name: recall, attentions: []}", "tasks.tasks[0].attentions", "non-empty list"),
])
def test_entry_attentions_errors_are_located(tmp_path, entry, key, message):
    from cab.config import ConfigError
    from cab.grid import expand

    path = write(tmp_path, f"name: bad\nattentions: [sdpa, no_mixing]\ntasks:\n  tasks: [{entry}]\n")
    with pytest.raises(ConfigError) as info:
        expand(path)
    assert info.value.key == key and message in str(info.value)


@pytest.mark.parametrize("section, key, message", [
    ("tasks: [lm, recal]", "tasks.tasks[1].name", "did you mean 'recall'"),
    ("tasks: [{name: lm, params: {lenght: 5}}]", "tasks.tasks[0].params.lenght", "no parameter 'lenght'"),
    ("tasks: [{name: lm, params: {length: -1}}]", "tasks.tasks[0].params.length", "greater than or equal"),
    ("tasks: [lm]\n  params: {length: 64}", "tasks.params.length", "every task has"),
    ("tasks: [lm]\n  attention_hparams: {vanila: {}}", "tasks.attention_hparams.vanila", "did you mean 'vanilla'"),
    ("tasks: [lm]\n  attention_hparams: {local: {windw: 3}}", "tasks.attention_hparams.local", "windw"),
    ("tasks: [{name: lm, params: {base_attention: nope}}]", "tasks.tasks[0].params.base_attention", "nope"),
])
def test_located_errors(tmp_path, section, key, message):
    from cab.config import ConfigError
    from cab.grid import expand

    path = write(tmp_path, f"name: bad\nattentions: [sdpa]\ntasks:\n  {section}\n")
    with pytest.raises(ConfigError) as info:
        expand(path)
    assert info.value.key == key and message in str(info.value)


def test_run_stores_task_results_and_resumes(tmp_path):
    from cab.run import run_grid
    from cab.store import ResultStore

    path = write(tmp_path, f"""\
        name: tiny-run
        attentions: [vanilla, performer]
        patterns: [CS]
        threads: 1
        tasks:
          progress: false
          params: {TINY}
          tasks:
            - name: recall
              params: {{length: 16, pairs: [2], key_vocab: 4, value_vocab: 4, eval_examples: 4}}
        """)
    db = tmp_path / "results.sqlite"
    summary = run_grid(path, db=db, render=False, progress=False)
    assert (summary.planned, summary.run, summary.counts) == (2, 2, {"ok": 2})
    with ResultStore(db) as store:
        results = {r.cell.attention: r for r in store.results()}
        assert results["performer"].cell.task == "recall"
        assert results["performer"].cell.task_params["pairs"] == [2]
        assert results["performer"].status is Status.OK
        assert len(results["vanilla"].metrics["loss_curve"]) == 3
        frame = store.dataframe()
        assert list(frame["task"]) == ["recall", "recall"] and "m_accuracy" in frame
    from cab.training.summary import long_metrics, summary_table

    long = long_metrics(frame)
    assert sorted(long["attention"]) == ["performer", "vanilla"] and set(long["metric"]) == {"accuracy"}
    assert list(summary_table(long)["rank"]) == [1, 1]  # one seed: no interval, so no separation
    again = run_grid(path, db=db, render=False, progress=False)
    assert (again.skipped, again.run) == (2, 0)


@pytest.mark.parametrize("name, seeds, tasks", [
    ("tasks-quick", 1, {"lm", "recall", "listops", "forecast", "lookup"}),
    ("tasks-panel-cpu", 3, {"lm", "recall", "listops", "forecast", "lookup"}),
    ("tasks-standard", 3, {"lm", "recall", "listops", "forecast", "lookup"}),
    ("cab-full", 3, {"lm", "pg19", "recall", "listops", "forecast", "ett", "lookup", "lra_text", "lra_retrieval"}),
])
def test_shipped_task_configs_expand(name, seeds, tasks):
    from cab.grid import expand

    cells = expand(ROOT / "configs" / f"{name}.yaml")
    cells = [c for c in cells if c.kind != "check"]  # tasks-quick also lists its gates' conformance cells
    assert {c.kind for c in cells} == {"task"} and {c.task for c in cells} == tasks
    assert {c.seed for c in cells} == set(range(seeds))
    assert {c.pattern for c in cells} == {"NS", "CS", "NC", "CC"}
    if name == "tasks-quick":  # every registered attention, in every pattern it declares that a task exercises
        from cab.registry import all_specs

        assert {(c.attention, c.pattern) for c in cells} == {
            (s.name, p) for s in all_specs() for p in s.patterns if p in {"NS", "CS", "NC", "CC"}}


@pytest.mark.parametrize("name, seeds, widths, lengths, cells, mixers", [
    ("zoology-mqar", 3, {64, 128, 256}, {64: [4], 128: [8], 256: [16]}, 171, 7),
    ("zoology-mqar-smoke", 1, {64, 128}, {64: [4], 128: [8]}, 17, 5),
])
def test_zoology_configs_sweep_width_and_length(name, seeds, widths, lengths, cells, mixers):
    from cab.grid import expand

    everything = expand(ROOT / "configs" / f"{name}.yaml")
    grid = [c for c in everything if c.kind == "task"]
    assert len(grid) == cells and {c.pattern for c in everything} == {"CS"}
    decode = [c for c in everything if c.kind != "task"]  # the state sizes: every mixer at every recall length
    assert {(c.kind, c.mode) for c in decode} == {("bench", "decode")} and len(decode) == mixers * len(lengths)
    assert {(c.attention, c.lk) for c in decode} == {(a, n) for a in {c.attention for c in grid} for n in lengths}
    assert {c.head_dim * c.heads for c in decode} == {max(widths)}
    assert {c.seed for c in grid} == set(range(seeds))
    assert {c.task_params["d_model"] for c in grid} == widths
    assert {c.task_params["length"]: c.task_params["pairs"] for c in grid} == lengths
    assert {c.task_params["binding"] for c in grid} == {"joint"}
    settings = {(c.task_params["length"], c.task_params["d_model"]) for c in grid}
    assert settings == {(length, width) for length in lengths for width in widths}
    for length, width in settings:  # exact attention and the control at every setting, the same recipe
        here = [c for c in grid if (c.task_params["length"], c.task_params["d_model"]) == (length, width)]
        assert {"sdpa", "no_mixing"} <= {c.attention for c in here}
        assert len({(c.task_params["lr"], c.task_params["steps"]) for c in here}) == 1
    assert {(c.task_params["d_model"]) for c in grid if c.attention == "routing"} == {64}


def test_long_panel_config_runs_at_long_lengths_with_costs_beside():
    """configs/tasks-long-cpu.yaml (issue 20): LM at 1,024 evaluated to 8x, MQAR at 512 with 32 pairs in both
    self patterns, 15 attentions with exact attention and the control on every task, 3 seeds, and forward
    benchmarks at the task lengths for the boards' cost columns."""
    from cab.grid import expand

    everything = expand(ROOT / "configs" / "tasks-long-cpu.yaml")
    grid = [c for c in everything if c.kind == "task"]
    assert {c.seed for c in grid} == {0, 1, 2} and len({c.attention for c in grid}) == 15
    by_task = {}
    for c in grid:
        by_task.setdefault((c.task, c.pattern), set()).add(c.attention)
    assert set(by_task) == {("lm", "CS"), ("recall", "CS"), ("recall", "NS")}
    for attentions in by_task.values():
        assert {"sdpa", "no_mixing"} <= attentions
    lm = {c.lq for c in grid if c.task == "lm"}
    assert lm == {1024} and {max(c.task_params["extrapolation_factors"]) for c in grid if c.task == "lm"} == {8}
    recall = [c for c in grid if c.task == "recall"]
    assert {c.lq for c in recall} == {512} and {tuple(c.task_params["pairs"]) for c in recall} == {(32,)}
    assert {c.task_params["steps"] for c in recall if c.pattern == "NS"} == {1200}  # NS needs more (the header)
    assert "window_global_random" not in {c.attention for c in recall}  # 79-94% of the pairs at 512: not sparse
    bench = [c for c in everything if c.kind == "bench"]
    assert {c.lq for c in bench} == {512, 1024} and {c.mode for c in bench} == {"fwd"}
    assert {(c.attention, c.pattern) for c in grid} <= {(c.attention, c.pattern) for c in bench}
