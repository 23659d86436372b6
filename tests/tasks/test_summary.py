"""cab.training.summary: task results in long form, summaries with intervals and ranks, the index."""

import statistics

import pandas as pd
import pytest

from cab.training.summary import LONG_FRAME_COLUMNS, long_metrics, summary_table, task_index


def store_rows():
    """Rows shaped like ResultStore.dataframe(): recall CS for three attentions, three seeds each."""
    accuracy = {"vanilla": [0.99, 0.98, 0.99], "performer": [0.40, 0.45, 0.42], "cosformer": [0.44, 0.47, 0.43]}
    rows = []
    for name, values in accuracy.items():
        label = "performer(num_features=8)" if name == "performer" else ""
        for seed, value in enumerate(values):
            rows.append({"kind": "task", "status": "ok", "task": "recall", "pattern": "CS", "attention": name,
                         "label": label, "seed": seed,
                         "metrics": {"accuracy": value, "accuracy_by_pairs": [{"pairs": 4, "accuracy": value}],
                                     "steps": 10}})
    rows.append({"kind": "task", "status": "error", "task": "recall", "pattern": "CS", "attention": "abc",
                 "label": "", "seed": 0, "metrics": {}})
    rows.append({"kind": "task", "status": "ok", "task": "no_such_task", "pattern": "CS", "attention": "abc",
                 "label": "", "seed": 0, "metrics": {"accuracy": 1.0}})
    rows.append({"kind": "bench", "status": "ok", "task": None, "pattern": "CS", "attention": "vanilla",
                 "label": "", "seed": 0, "metrics": {"median_ms": 1.0}})
    rows.append({"kind": "task", "status": "ok", "task": "lm", "pattern": "CS", "attention": "vanilla",
                 "label": "", "seed": 0, "metrics": {"bpc": 3.5, "extrapolation": [{"length": 8, "bpc": 3.6}]}})
    return pd.DataFrame(rows)


def test_long_metrics_keep_declared_scalar_metrics_of_finished_task_cells():
    long = long_metrics(store_rows())
    assert tuple(long.columns) == LONG_FRAME_COLUMNS
    assert set(long["attention"]) == {"vanilla", "performer(num_features=8)", "cosformer"}
    assert set(long["metric"]) == {"accuracy", "bpc"}  # curves and undeclared numbers are left out
    assert len(long) == 10
    bpc = long[long["metric"] == "bpc"].iloc[0]
    assert (bpc["direction"], bool(bpc["index"]), bpc["value"]) == (-1, True, 3.5)
    assert long_metrics(pd.DataFrame({"kind": ["bench"], "status": ["ok"]})).empty


def test_summary_ranks_apart_only_separated_intervals():
    table = summary_table(long_metrics(store_rows()))
    recall = table[table["task"] == "recall"].set_index("attention")
    assert recall.loc["vanilla", "mean"] == pytest.approx(statistics.fmean([0.99, 0.98, 0.99]))
    assert recall.loc["cosformer", "std"] == pytest.approx(statistics.stdev([0.44, 0.47, 0.43]))
    assert recall.loc["vanilla", "rank"] == 1
    assert recall.loc["cosformer", "rank"] == recall.loc["performer(num_features=8)", "rank"] == 2
    assert list(recall.index) == ["vanilla", "cosformer", "performer(num_features=8)"]
    lm = table[table["task"] == "lm"].iloc[0]
    assert lm["n"] == 1 and lm["rank"] == 1 and pd.isna(lm["ci_low"])


def test_task_index_uses_the_index_metrics():
    result = task_index(long_metrics(store_rows()))
    table = result.table.set_index("attention")
    assert table.loc["vanilla", "index"] > 0 > table.loc["performer(num_features=8)", "index"]
    assert set(result.reference["metric"]) == {"accuracy", "bpc"}
    assert table.loc["vanilla", "n_tasks"] == 2 and table.loc["cosformer", "n_tasks"] == 1
