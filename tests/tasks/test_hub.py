"""The tasks for machines that reach the dataset hub (PG-19, ETT, LRA text and retrieval), run end to end
through `datasets` on small local files in the formats the real sets use."""

import csv
import json

import pytest

from cab.status import Status
from cab.tasks import MissingData, create_task, load_tasks
from cab.training.cell_kind import run_task

load_tasks()
from cab_tasks._data import load_hub_dataset  # noqa: E402

TINY = {"steps": 3, "batch_size": 4, "d_model": 16, "heads": 2, "layers": 1, "eval_batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pg19_from_local_json_books(tmp_path):
    books = [{"short_book_title": f"Book {i}", "text": f"Chapter {i}. " + "It was a dark and stormy night. " * 20}
             for i in range(3)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", books[:2]),
             "test": write_jsonl(tmp_path / "test.jsonl", books[2:])}
    params = {**TINY, "dataset": "json", "data_files": files, "length": 16, "eval_chars": 64,
              "max_train_chars": 500}
    task = create_task("pg19", params)
    data = task.prepare()
    assert len(data["train"]) == 500
    assert data["test"][:10].numpy().tobytes() == b"Chapter 2."
    outcome = run_task(task, "sdpa", "CS", gate=False)
    assert outcome.status is Status.OK, outcome.message
    assert [p["length"] for p in outcome.metrics["extrapolation"]] == [8, 16, 32, 64, 128]
    assert 0 < outcome.metrics["bpc"] < 9


def test_ett_from_a_local_csv(tmp_path):
    path = tmp_path / "ETTh1.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["date", "HUFL", "HULL", "OT"])
        for i in range(300):
            writer.writerow([f"2016-07-01 {i % 24:02d}:00:00", 5 + (i % 24) / 10, 2.0 - (i % 7) / 10, 30 + (i % 24)])
    params = {**TINY, "data_files": str(path), "history": 24, "horizon": 12, "eval_windows": 5}
    task = create_task("ett", params)
    values, target = task.series()
    assert values.shape == (300, 3) and target == 2
    for pattern in ("NC", "CC"):
        outcome = run_task(task, "vanilla", pattern, gate=False)
        assert outcome.status is Status.OK, outcome.message
        assert outcome.metrics["test_windows"] == 5 and outcome.metrics["mse"] >= 0
    with pytest.raises(MissingData, match="no target column 'load'"):
        create_task("ett", {**params, "target": "load"}).series()


def test_lra_text_from_local_reviews(tmp_path):
    rows = [{"text": ("great film " if i % 2 else "dull plot ") * (3 + i % 5), "label": i % 2} for i in range(24)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows[:16]),
             "test": write_jsonl(tmp_path / "test.jsonl", rows[16:])}
    task = create_task("lra_text", {**TINY, "dataset": "json", "data_files": files, "max_length": 40})
    data = task.prepare()
    examples, labels = data["train"]
    assert len(examples) == 16 and max(len(e) for e in examples) == 40
    assert examples[0][:5].tolist() == [b + 1 for b in b"dull "]
    outcome = run_task(task, "performer", "NS", gate=False)
    assert outcome.status is Status.OK and 0 <= outcome.metrics["accuracy"] <= 1
    assert outcome.metrics["chance"]["accuracy"] == 0.5


def test_lra_retrieval_from_headerless_tsv(tmp_path):
    files = {}
    for split, count in (("train", 12), ("test", 6)):
        path = tmp_path / f"new_aan_pairs.{split}.tsv"
        with path.open("w") as handle:
            for i in range(count):
                handle.write(f"{i % 2}\tpaper{i}\tpaper{i + 1}\tWe study \"attention\" {i}.\tA survey {i}.\n")
        files[split] = str(path)
    task = create_task("lra_retrieval", {**TINY, "data_files": files, "max_length": 32})
    data = task.prepare()
    (first, second), label = data["train"][0][1], data["train"][1][1]
    assert bytes((first - 1).tolist()) == b'We study "attention" 1.' and bytes((second - 1).tolist()) == b"A survey 1."
    assert int(label) == 1
    outcome = run_task(task, "sdpa", "NS", gate=False)
    assert outcome.status is Status.OK, outcome.message
    with pytest.raises(MissingData, match="data_files"):
        create_task("lra_retrieval", TINY).prepare()


def test_unreadable_files_are_missing_data(tmp_path):
    with pytest.raises(MissingData, match="data_files"):
        load_hub_dataset("json", split="train", data_files=str(tmp_path / "absent.jsonl"))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "To be, or not to be. " * 20}])
    task = create_task("pg19", {"dataset": "json", "data_files": {"train": train}})
    with pytest.raises(MissingData, match="no 'test' split"):
        task.prepare()
