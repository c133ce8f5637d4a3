"""Tasks by name: any BIG-bench JSON task (``bigbench:<task>``, subtasks included) and Hugging Face
datasets by local path through ``datasets`` (``hf:<path>?<column mapping>``), with no network."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from asymlora.cli import main
from asymlora.data import DataFormatError, get_task
from asymlora.data.bigbench import BigBenchUnavailableError

BASE = "bigbench-1.0.0/bigbench/benchmark_tasks"


def mc(prefix: str, n: int) -> dict:
    return {"examples": [{"input": f"{prefix} {i}?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                         for i in range(n)]}  # fmt: skip


@pytest.fixture
def sdist(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A miniature BIG-bench sdist: a task with two subtasks (its own file has no examples), a
    numeric task, and a text task."""
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    files = {
        "family/task.json": {"name": "family", "examples": []},
        "family/one/task.json": mc("one", 6),
        "family/two/task.json": mc("two", 4),
        "sums/task.json": {"examples": [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(5)]},
        "words/task.json": {"examples": [{"input": f"say {i}", "target": ["hello", "hi"]} for i in range(5)]},
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"{BASE}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(path))
    return path


def test_any_bigbench_task_by_name_with_its_subtasks(sdist, tmp_path, monkeypatch) -> None:
    family = get_task("bigbench:family")
    assert family.kind == "multiple_choice" and len(family.examples()) == 10  # both subtasks pooled
    assert family.source == "BIG-bench family/one, family/two"
    two = get_task("bigbench:family/two")
    assert two.name == "family.two" and len(two.examples()) == 4
    assert get_task("bigbench:sums").kind == "numeric" and get_task("bigbench:words").kind == "text"
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(tmp_path / "gone.tar.gz"))
    assert len(get_task("bigbench:family").examples()) == 10  # fetched once: the source is not read again
    with pytest.raises(BigBenchUnavailableError, match="not a BIG-bench task name"):
        get_task("bigbench:../etc")


def test_unknown_bigbench_task_is_named(sdist) -> None:
    with pytest.raises(BigBenchUnavailableError, match="no task.json for: nope"):
        get_task("bigbench:nope")


def test_eval_runs_a_bigbench_task_by_name(sdist, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-llama", "--task", "bigbench:family", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["tasks"][0]["n"] == 2  # 20% of 10


def saved_dataset(tmp_path: Path) -> Path:
    features = Features(
        {"question": Value("string"), "options": Sequence(Value("string")), "label": Value("int64")}
    )
    rows = {"question": [f"Is {i} even?" for i in range(10)], "options": [["yes", "no"]] * 10,
            "label": [i % 2 for i in range(10)]}  # fmt: skip
    data = Dataset.from_dict(rows, features=features)
    folder = tmp_path / "saved"
    DatasetDict({"train": data.select(range(7)), "test": data.select(range(7, 10))}).save_to_disk(str(folder))
    return folder


def test_a_dataset_saved_to_disk_with_a_column_mapping_keeps_its_splits(tmp_path) -> None:
    folder = saved_dataset(tmp_path)
    task = get_task(f"hf:{folder}?prompt=question&choices=options&answer=label")
    assert task.kind == "multiple_choice" and task.name == "saved"
    examples = task.examples()
    assert len(examples) == 10  # both splits
    assert examples[3]["input"] == "Is 3 even?" and examples[3]["targets"] == ["no"]
    splits = task.splits(seed=1)
    assert sorted(splits["test"]["input"]) == [f"Is {i} even?" for i in (7, 8, 9)]  # its own test split
    assert sorted(splits["train"]["input"]) == sorted(f"Is {i} even?" for i in range(7))
    assert splits["test"]["input"] != task.splits(seed=2)["test"]["input"]  # each shuffled by the seed
    assert [ex.prompt for ex in task.train_examples(seed=1)] == splits["train"]["input"]
    only_test = get_task(f"hf:{folder}?prompt=question&choices=options&answer=label&split=test&name=evens")
    assert only_test.name == "evens" and len(only_test.examples()) == 3
    assert len(only_test.splits()["test"]) == 1  # one split named: the task cuts its own 80/20


def write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a .json, .jsonl, .csv or .parquet file, by ``path``'s suffix."""
    data = Dataset.from_list(rows)
    if path.suffix == ".csv":
        data.to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        data.to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        data.to_json(str(path), lines=True)
    return path


SUMS = [{"q": f"{i}+{i}=", "a": 2 * i} for i in range(12)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_one_data_file(tmp_path, suffix) -> None:
    path = write_rows(tmp_path / f"my.sums{suffix}", SUMS)
    task = get_task(f"hf:{path}?prompt=q&target=a")
    assert task.name == "my.sums" and task.kind == "numeric"
    assert task.examples()["input"] == [r["q"] for r in SUMS] and task.examples()[5]["targets"] == ["10"]
    splits = task.splits()
    assert (len(splits["train"]), len(splits["test"])) == (10, 2)  # one file: pooled and cut 80/20


def test_a_folder_with_train_and_validation_files_keeps_them(tmp_path, capsys) -> None:
    folder = tmp_path / "qa"
    folder.mkdir()
    rows = [{"prompt": f"Is {i} odd?", "choices": ["yes", "no"], "answer": "no" if i % 2 else "yes"}
            for i in range(9)]  # fmt: skip
    write_rows(folder / "train.jsonl", rows[:6] + rows[7:8])  # "Is 7 odd?" is in both files
    write_rows(folder / "validation.jsonl", rows[6:])
    task = get_task(f"hf:{folder}")
    splits = task.splits()
    assert sorted(splits["test"]["input"]) == [f"Is {i} odd?" for i in (6, 7, 8)]
    assert sorted(splits["train"]["input"]) == [f"Is {i} odd?" for i in range(6)]  # 7 only in test
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-llama", "--task", f"hf:{folder}", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["tasks"][0]["n"] == 3  # the validation file


def test_data_file_mistakes_are_one_line(tmp_path, capsys) -> None:
    path = write_rows(tmp_path / "sums.csv", SUMS)
    (tmp_path / "sums.txt").write_text("1+1=2\n")
    with pytest.raises(
        DataFormatError, match=r"cannot read a \.txt file; give a \.json, \.jsonl, \.csv, \.parquet"
    ):
        get_task(f"hf:{tmp_path / 'sums.txt'}")
    with pytest.raises(DataFormatError, match="sums.csv: cannot load this dataset"):
        get_task(f"hf:{path}?prompt=q&target=a&split=test")  # one file holds one split, train
    (tmp_path / "qa").mkdir()
    write_rows(tmp_path / "qa" / "train.csv", SUMS)
    write_rows(tmp_path / "qa" / "test.csv", [{"question": "1+1=", "a": 2}])
    assert main(["eval", "--model", "tiny-llama", "--task", f"hf:{tmp_path / 'qa'}?prompt=q&target=a"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' own progress lines
    assert last.startswith("asymlora eval: error: hf:") and "qa: cannot load this dataset" in last
    assert "column names don't match" in last
    saved = saved_dataset(tmp_path)  # a saved dataset's splits are not checked against each other on load
    data = DatasetDict.load_from_disk(str(saved))
    DatasetDict(train=data["train"], test=data["test"].rename_column("question", "text")).save_to_disk(
        str(tmp_path / "renamed")
    )
    with pytest.raises(
        DataFormatError, match="no column question in split test; the columns are text, options"
    ):
        get_task(f"hf:{tmp_path / 'renamed'}?prompt=question&choices=options&answer=label")


def test_class_label_names_are_the_choices(tmp_path) -> None:
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    data = Dataset.from_dict(
        {"text": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]}, features=features
    )
    data.save_to_disk(str(tmp_path / "sentiment"))
    task = get_task(f"hf:{tmp_path / 'sentiment'}?prompt=text&answer=label")
    assert task.kind == "multiple_choice"
    assert task.examples()[0]["choices"] == ["negative", "positive"] and task.examples()[1]["answer"] == 0


def test_local_data_files_through_load_dataset(tmp_path, capsys) -> None:
    folder = tmp_path / "sums"
    folder.mkdir()
    (folder / "data.jsonl").write_text(
        "".join(json.dumps({"q": f"{i}+{i}=", "a": 2 * i}) + "\n" for i in range(12))
    )
    task = get_task(f"hf:{folder}?prompt=q&target=a")
    assert task.kind == "numeric" and task.examples()[5]["targets"] == ["10"]
    out = tmp_path / "eval"
    assert (
        main(["eval", "--model", "tiny-llama", "--task", f"hf:{folder}?prompt=q&target=a", "--out", str(out)])
        == 0
    )
    assert json.loads((out / "results.json").read_text())["tasks"][0]["metric"] == "exact_match"


def test_column_mapping_mistakes_are_named(tmp_path) -> None:
    folder = saved_dataset(tmp_path)
    with pytest.raises(
        DataFormatError, match="no column prompt in split train; the columns are question, options, label"
    ):
        get_task(f"hf:{folder}?choices=options&answer=label")
    with pytest.raises(DataFormatError, match="unknown option.*colour"):
        get_task(f"hf:{folder}?colour=red")
    with pytest.raises(DataFormatError, match="no such file or folder"):
        get_task(f"hf:{tmp_path / 'nothing-here'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="cannot load this dataset"):
        get_task(f"hf:{tmp_path / 'empty'}")
