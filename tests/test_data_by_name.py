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


def test_a_dataset_saved_to_disk_with_a_column_mapping(tmp_path) -> None:
    folder = saved_dataset(tmp_path)
    task = get_task(f"hf:{folder}?prompt=question&choices=options&answer=label")
    assert task.kind == "multiple_choice" and task.name == "saved"
    examples = task.examples()
    assert len(examples) == 10  # every split pooled; the task makes its own train/test split
    assert examples[3]["input"] == "Is 3 even?" and examples[3]["targets"] == ["no"]
    only_test = get_task(f"hf:{folder}?prompt=question&choices=options&answer=label&split=test&name=evens")
    assert only_test.name == "evens" and len(only_test.examples()) == 3


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
    with pytest.raises(DataFormatError, match="no column prompt; the columns are question, options, label"):
        get_task(f"hf:{folder}?choices=options&answer=label")
    with pytest.raises(DataFormatError, match="unknown option.*colour"):
        get_task(f"hf:{folder}?colour=red")
    with pytest.raises(DataFormatError, match="no such file or folder"):
        get_task(f"hf:{tmp_path / 'nothing-here'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="cannot load this dataset"):
        get_task(f"hf:{tmp_path / 'empty'}")
