"""Tasks and suites: every loader on small files written here, splits, and the error messages."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from asymlora.cli import main
from asymlora.data import (
    SUITES,
    TASKS,
    DataFormatError,
    PromptTemplate,
    Task,
    UnknownTaskError,
    bigbench,
    client_tasks,
    continuation,
    ensure_bigbench,
    file_task,
    get_suite,
    get_task,
    mc_record,
    target_record,
)
from asymlora.data.bigbench import (
    BigBenchUnavailableError,
    ensure_bigbench_tree,
    read_task_json,
    records_from_task,
)

# --- fixtures in the real formats -----------------------------------------------------------------

MC_TASK = {
    "name": "toy_mc",
    "task_prefix": "Answer the question.\n",
    "append_choices_to_input": False,
    "examples": [
        {"input": "Is water wet?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Is fire cold?", "target_scores": {"Yes": 0, "No": 1}},
        {"input": "Pick two.", "target_scores": {"one": 0.0, "two": 1.0, "three": 0.0}},
    ],
}
NUMERIC_TASK = {"name": "add", "examples": [{"input": "What is 2 plus 3?", "target": "5"}]}
TEXT_TASK = {"name": "qa", "examples": [{"input": "Name a color.", "target": ["Red.", "Blue."]}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _add(tar: tarfile.TarFile, name: str, data: dict) -> None:
    raw = json.dumps(data).encode()
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    """A miniature bigbench-1.0.0.tar.gz laid out like the real one."""
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    base = "bigbench-1.0.0/bigbench/benchmark_tasks"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{base}/toy_mc/task.json", MC_TASK)
        _add(tar, f"{base}/arith/add/task.json", NUMERIC_TASK)
        _add(tar, f"{base}/unused/task.json", TEXT_TASK)
    return path


def make_task(records: list[dict], kind: str = "multiple_choice", **options) -> Task:
    return Task("toy", kind, lambda: records, **options)


# --- splits ---------------------------------------------------------------------------------------


def numbered_task(n: int = 50) -> Task:
    return make_task([target_record(f"question {i}", str(i)) for i in range(n)], "numeric")


def test_splits_are_deterministic_disjoint_and_complete() -> None:
    task = numbered_task()
    a, b = task.splits(seed=0), numbered_task().splits(seed=0)
    assert a["test"]["input"] == b["test"]["input"] and a["train"]["input"] == b["train"]["input"]
    train, test = set(a["train"]["input"]), set(a["test"]["input"])
    assert not train & test
    assert train | test == {f"question {i}" for i in range(50)}
    assert len(test) == 10  # test_fraction 0.2


def test_other_seed_gives_other_split() -> None:
    assert set(numbered_task().splits(0)["test"]["input"]) != set(numbered_task().splits(1)["test"]["input"])


def test_duplicate_prompts_never_straddle_the_split() -> None:
    records = [target_record(f"q{i % 10}", "1") for i in range(40)]  # every prompt 4 times
    splits = make_task(records, "numeric").splits(seed=5)
    assert len(splits["train"]) + len(splits["test"]) == 10
    assert not set(splits["train"]["input"]) & set(splits["test"]["input"])


def test_max_test_caps_the_test_split() -> None:
    task = make_task([target_record(f"q{i}", "1") for i in range(100)], "numeric", max_test=7)
    assert len(task.splits(0)["test"]) == 7


def test_one_example_cannot_be_split() -> None:
    with pytest.raises(DataFormatError, match="need at least 2"):
        numbered_task(1).splits(0)


# --- prompt templates -------------------------------------------------------------------------------


def test_template_renders_prefixes_and_choices() -> None:
    tpl = PromptTemplate(prefix="Instr.\n", input_prefix="\nQ: ", output_prefix="\nA: ", list_choices=True)
    assert tpl.render("2+2?", ["3", "4"]) == "Instr.\n\nQ: 2+2?\n  choice: 3\n  choice: 4\nA:"
    assert continuation(" 4 ") == " 4"


def test_task_prompt_and_target() -> None:
    task = make_task([mc_record("Sky?", ["green", "blue"], 1)], template=PromptTemplate())
    ex = task.examples()[0]
    assert task.prompt(ex) == "Q: Sky?\nA:"
    assert task.target(ex) == "blue"


# --- BIG-bench ----------------------------------------------------------------------------------------


def test_bigbench_extracts_only_the_requested_tasks_from_the_sdist(
    sdist: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(sdist))
    root = ensure_bigbench(["toy_mc", "arith/add"], cache)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("task.json")) == [
        "arith/add/task.json",
        "toy_mc/task.json",
    ]
    assert json.loads((root / "toy_mc/task.json").read_text()) == MC_TASK
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(sdist.parent / "gone.tar.gz"))
    ensure_bigbench(["toy_mc"], cache)  # present already: the source is not touched


def test_bigbench_reads_an_unpacked_source_tree(tmp_path: Path, cache: Path, monkeypatch) -> None:
    tasks = tmp_path / "src" / "bigbench" / "benchmark_tasks" / "toy_mc"
    tasks.mkdir(parents=True)
    (tasks / "task.json").write_text(json.dumps(MC_TASK))
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(tmp_path / "src"))
    root = ensure_bigbench(["toy_mc"], cache)
    assert (root / "toy_mc" / "task.json").is_file()


def test_bigbench_missing_task_is_named(sdist: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(sdist))
    with pytest.raises(BigBenchUnavailableError, match="no task.json for: nope"):
        ensure_bigbench(["toy_mc", "nope"], cache)


def test_bigbench_reads_a_zip_of_the_repository_with_subtasks(
    tmp_path: Path, cache: Path, monkeypatch
) -> None:
    """GitHub's "Download ZIP" of google/BIG-bench: one top folder, then the source tree."""
    archive = tmp_path / "BIG-bench-main.zip"
    base = "BIG-bench-main/bigbench/benchmark_tasks"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{base}/toy_mc/", "")  # a folder entry, as GitHub's archives have
        zipped.writestr(f"{base}/toy_mc/task.json", json.dumps(MC_TASK))
        zipped.writestr(f"{base}/arith/task.json", json.dumps({"name": "arith", "examples": []}))
        zipped.writestr(f"{base}/arith/add/task.json", json.dumps(NUMERIC_TASK))
        zipped.writestr(f"{base}/arith/add/README.md", "not a task")
    monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(archive))
    root = ensure_bigbench(["toy_mc"], cache)
    assert json.loads((root / "toy_mc/task.json").read_text()) == MC_TASK
    assert ensure_bigbench_tree("arith", cache) == ["arith/add"]
    assert json.loads((root / "arith/add/task.json").read_text()) == NUMERIC_TASK


def test_bigbench_bad_sources_are_named_and_leave_no_files(tmp_path: Path, cache: Path, monkeypatch) -> None:
    damaged = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(damaged, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/toy_mc/task.json", MC_TASK)
    damaged.write_bytes(damaged.read_bytes()[:-40])  # a download cut short
    cut_zip = tmp_path / "BIG-bench-main.zip"
    with zipfile.ZipFile(cut_zip, "w") as zipped:
        zipped.writestr("BIG-bench-main/bigbench/benchmark_tasks/toy_mc/task.json", json.dumps(MC_TASK))
    cut_zip.write_bytes(cut_zip.read_bytes()[:-30])  # its central directory is lost
    for source, why in [
        (damaged, "is damaged"),
        (cut_zip, "is damaged"),
        (tmp_path / "gone.zip", "does not exist; get the task files another way"),
        (write_jsonl(tmp_path / "notes.txt", ["hello"]), "neither a folder nor a .tar.gz or .zip"),
    ]:
        monkeypatch.setenv("ASYMLORA_BIGBENCH_SOURCE", str(source))
        with pytest.raises(BigBenchUnavailableError, match=why):
            ensure_bigbench(["toy_mc"], cache)
    assert not list(cache.rglob("task.json"))


def test_a_failed_download_is_tried_once_per_process(
    tmp_path: Path, cache: Path, monkeypatch, capsys
) -> None:
    """Real pip, offline: an index-less pip cannot find the sdist. Every task of a suite asks for
    the files; pip must run once, not once per task (with a network timeout each run can take
    minutes), and `asymlora tasks` says why once and exits 1 (so that a script can stop there)."""
    monkeypatch.delenv("ASYMLORA_BIGBENCH_SOURCE", raising=False)
    monkeypatch.setattr(bigbench, "_failed_downloads", {})
    for name, value in {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path),
        "PIP_CONFIG_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    attempts: list[str] = []
    for _ in range(2):
        with pytest.raises(
            BigBenchUnavailableError, match="could not download bigbench==1.0.0.*google/BIG-bench"
        ):
            ensure_bigbench(["toy_mc"], cache, log=attempts.append)
    assert len(attempts) == 1
    assert main(["tasks", "--suite", "commonsense"]) == 1
    out, err = capsys.readouterr()
    assert out.count("unavailable (1, below)") == 8 and "(2" not in out
    assert err.count("could not download bigbench==1.0.0") == 1 and "fetching" not in err


def test_bigbench_multiple_choice_records_use_the_task_template(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(MC_TASK))
    records = records_from_task(read_task_json(path), "multiple_choice", where="toy")
    # the choices come in an order drawn from each question's text; the answer follows its choice
    assert [r["choices"][r["answer"]] for r in records] == ["Yes", "No", "two"]
    assert [r["targets"] for r in records] == [["Yes"], ["No"], ["two"]]
    assert sorted(records[2]["choices"]) == ["one", "three", "two"]
    assert records[0]["input"] == "Answer the question.\n\nQ: Is water wet?\nA:"
    again = records_from_task(read_task_json(path), "multiple_choice", where="toy")
    assert [r["choices"] for r in again] == [r["choices"] for r in records]  # the same every time


def test_bigbench_choice_order_does_not_give_the_answer_away() -> None:
    # a task whose correct choice is always listed third, as timedial's is in BIG-bench
    examples = [
        {"input": f"Question {i}?", "target_scores": {f"a{i}": 0, f"b{i}": 0, f"c{i}": 1}} for i in range(300)
    ]
    records = records_from_task({"examples": examples}, "multiple_choice", where="t")
    positions = [r["answer"] for r in records]
    assert all(60 <= positions.count(k) <= 140 for k in range(3))  # near uniform, not all 2
    assert all(r["choices"][r["answer"]] == f"c{i}" for i, r in enumerate(records))


def test_bigbench_numeric_and_text_records() -> None:
    (num,) = records_from_task(NUMERIC_TASK, "numeric", where="add")
    assert num["input"] == "Q: What is 2 plus 3?\nA:" and num["targets"] == ["5"]
    (text,) = records_from_task(TEXT_TASK, "text", where="qa")
    assert text["targets"] == ["Red.", "Blue."]


def test_bigbench_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text('{"examples": [\n{"input": "x",\n}]}')
    with pytest.raises(DataFormatError, match=r"task\.json:3: invalid JSON"):
        read_task_json(path)


def test_bigbench_example_without_choices_is_reported() -> None:
    with pytest.raises(DataFormatError, match="example 0 has no 'target_scores'"):
        records_from_task({"examples": [{"input": "x", "target": "y"}]}, "multiple_choice", where="t")


# --- user JSONL -------------------------------------------------------------------------------------


def test_user_jsonl_multiple_choice(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
            {"prompt": "Sky is", "choices": ["blue", "green"], "answer": "blue"},
        ],
    )
    task = file_task(path)
    assert (task.name, task.kind) == ("mine", "multiple_choice")
    data = task.examples()
    assert data["answer"] == [1, 0] and data["targets"] == [["4"], ["blue"]]
    assert task.prompt(data[0]) == "2+2="


def test_user_jsonl_targets_numeric_or_text(tmp_path: Path) -> None:
    nums = file_task(
        write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "target": 3}, {"prompt": "b", "target": "1,000"}])
    )
    text = file_task(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "target": ["x", "y"]}]))
    assert nums.kind == "numeric" and nums.examples()["targets"] == [["3"], ["1,000"]]
    assert text.kind == "text" and text.examples()["targets"] == [["x", "y"]]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "target": "1"}\n\n{"prompt": "b", "target": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        file_task(path)


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": 0},
                                              {"prompt": "b", "choices": ["x", "y"], "answer": 5}])  # fmt: skip
    with pytest.raises(DataFormatError, match=r"m\.jsonl:2: 'answer' must be an index"):
        file_task(path)


def test_unrecognised_keys_are_listed(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"u\.jsonl:1: unrecognised record keys \['question'\]"):
        file_task(write_jsonl(tmp_path / "u.jsonl", [{"question": "?"}]))


# --- LLM-Adapters and FedDPA / FLAN formats -----------------------------------------------------------

COMMONSENSE_170K = [
    {
        "instruction": "Please choose the correct answer to fill in the blank: Ian ate it because _ was hungry."
        "\n\nOption1: Ian\nOption2: Dennis\n\nAnswer format: option1/option2",
        "input": "",
        "output": "the correct answer is option1",
        "answer": "option1",
    },
    {
        "instruction": "Please answer the following question with true or false, question: is the sky blue?"
        "\n\nAnswer format: true/false",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
]
MATH_10K = [
    {"instruction": "Tom has 3 apples and buys 4. How many?", "input": "", "output": "3+4=7", "answer": "7"},
    {"instruction": "Half of 10?", "input": "", "output": "10/2=5", "answer": "5.0"},
]


def test_llm_adapters_commonsense_choices_come_from_the_answer_format(tmp_path: Path) -> None:
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps(COMMONSENSE_170K))
    task = file_task(path)
    data = task.examples()
    assert task.kind == "multiple_choice"
    assert data["choices"] == [["option1", "option2"], ["true", "false"]] and data["answer"] == [0, 0]
    prompt = task.prompt(data[0])
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:")


def test_llm_adapters_math_is_numeric(tmp_path: Path) -> None:
    path = tmp_path / "math_10k.json"
    path.write_text(json.dumps(MATH_10K))
    task = file_task(path)
    assert task.kind == "numeric" and task.examples()["targets"] == [["7"], ["5.0"]]


def test_llm_adapters_answer_outside_the_labels_is_reported(tmp_path: Path) -> None:
    bad = [dict(COMMONSENSE_170K[0], answer="option3")]
    path = tmp_path / "cs.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"cs\.json: item 0: answer 'option3' is not one of"):
        file_task(path)


def test_feddpa_clients_one_file_each(tmp_path: Path) -> None:
    folder = tmp_path / "clients"
    folder.mkdir()
    write_jsonl(
        folder / "client_0.jsonl", [{"instruction": "Paraphrase.", "input": "Hi there", "output": "Hello"}]
    )
    write_jsonl(folder / "client_1.jsonl", [{"instruction": "Summarise.", "context": "Long text", "response": "Short",
                                            "category": "summarization"}])  # fmt: skip
    tasks = client_tasks(folder)
    assert [t.name for t in tasks] == ["client_0", "client_1"] and {t.kind for t in tasks} == {"text"}
    ex = tasks[1].examples()[0]
    assert ex["targets"] == ["Short"] and "### Input:\nLong text" in tasks[1].prompt(ex)


def test_instruction_without_output_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "z"}])
    with pytest.raises(DataFormatError, match=r"c\.jsonl:2: missing or empty 'output'"):
        file_task(path)


# --- registry ---------------------------------------------------------------------------------------


def test_suites_have_the_promised_shape() -> None:
    sizes = {name: len(get_suite(name)) for name in SUITES}
    assert sizes == {"commonsense": 8, "math": 3, "nlp-multitask": 8, "fed-nlp": 8, "reasoning": 4}
    assert {t.kind for t in get_suite("commonsense")} == {"multiple_choice"}
    assert {t.kind for t in get_suite("reasoning")} == {"multiple_choice"}
    assert {t.kind for t in get_suite("fed-nlp")} == {"text"}
    assert {t.kind for t in get_suite("math")} == {"multiple_choice", "numeric"}


def test_unknown_task_lists_the_available_ones() -> None:
    with pytest.raises(UnknownTaskError) as err:
        get_task("social_iq")
    assert "unknown task 'social_iq'" in str(err.value) and "social_iqa" in str(err.value)
    with pytest.raises(UnknownTaskError, match="available suites: commonsense, math, nlp-multitask, fed-nlp"):
        get_suite("common")


def test_a_file_path_is_a_task(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "target": "b"}, {"prompt": "c", "target": "d"}])
    assert get_task(str(path)).examples()["input"] == ["a", "c"]


def test_gsm_symbolic_is_generated_offline_and_deterministically() -> None:
    pytest.importorskip("reasoning_gym")
    task = TASKS["gsm_symbolic"]
    records = task.load()
    assert len(records) == 1000 and records == task.load()
    assert all(float(r["targets"][0]) == float(r["targets"][0]) for r in records[:50])
    assert task.kind == "numeric" and task.answer_position == "last"


def test_a_closed_answer_set_becomes_the_choices_of_every_question() -> None:
    from asymlora.data.registry import closed_set_records

    items = [{"question": " Who? ", "answer": "son"}, {"question": "Q2", "answer": "wife"},
             {"question": "Q3", "answer": 3}, {"question": "Q4", "answer": "son "}]  # fmt: skip
    records = closed_set_records(items)
    assert [r["choices"] for r in records] == [["3", "son", "wife"]] * 4  # shortest first, then alphabetical
    assert [r["answer"] for r in records] == [1, 2, 0, 1] and records[0]["input"] == "Who?"
    assert [r["targets"] for r in records] == [["son"], ["wife"], ["3"], ["son"]]


def test_the_reasoning_suite_is_generated_offline_and_deterministically(cache) -> None:
    pytest.importorskip("reasoning_gym")
    for task in get_suite("reasoning"):
        records = task.load()
        assert len(records) == 1000 and records == task.load(), task.name
        assert 2 <= len(records[0]["choices"]) <= 16 and all(
            r["choices"] == records[0]["choices"] for r in records
        )
        prompt = task.prompt(records[0])
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert not list(cache.rglob("*")), "nothing is downloaded or written"


@pytest.mark.real_data
def test_real_commonsense_suite_counts() -> None:
    from asymlora.data.registry import is_downloaded

    tasks = get_suite("commonsense")
    if not all(is_downloaded(t) for t in tasks):
        pytest.skip("BIG-bench files not downloaded (run `asymlora tasks` once)")
    sizes = {t.name: len(t.examples()) for t in tasks}
    assert sizes["physical_intuition"] == 81 and sizes["date_understanding"] == 369
    assert all(n > 50 for n in sizes.values())


def test_a_grouped_split_keeps_each_item_on_one_side_and_is_seeded():
    from asymlora.data.task import build_dataset, split_dataset

    records = [
        mc_record(f"sentence {k % 7}. reasoning {k}", ["correct", "incorrect"], k % 2) for k in range(40)
    ]
    data = build_dataset(records, kind="multiple_choice", where="t")

    def item(text):
        return text.split(".")[0]

    splits = split_dataset(data, seed=3, test_fraction=0.2, group=item)
    train = {item(x) for x in splits["train"]["input"]}
    test = {item(x) for x in splits["test"]["input"]}
    assert not train & test and train | test == {f"sentence {k}" for k in range(7)}
    assert len(splits["train"]) + len(splits["test"]) == 40 and len(splits["test"]) >= 8
    again = split_dataset(data, seed=3, test_fraction=0.2, group=item)
    assert again["test"]["input"] == splits["test"]["input"]
    ungrouped = split_dataset(data, seed=3, test_fraction=0.2)
    assert {item(x) for x in ungrouped["train"]["input"]} & {item(x) for x in ungrouped["test"]["input"]}
