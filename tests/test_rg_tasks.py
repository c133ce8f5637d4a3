"""Any reasoning-gym dataset as a task (``rg:<dataset>?<options>``): its settings reach
``reasoning_gym.create_dataset``, closed answer sets become multiple choice, and every other
dataset is scored by its own ``score_answer``, checked here against reasoning-gym called directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reasoning_gym

from asymlora.cli import main
from asymlora.data import get_task
from asymlora.data.task import UnknownTaskError
from asymlora.errors import InputError
from asymlora.eval.runner import generated_result, majority_result
from asymlora.eval.runner import test_examples as questions_of


def reference_scores(dataset: str, outputs: list[str], questions: list[str], **settings) -> list[float]:
    """Each output scored by a fresh reasoning-gym dataset of the same settings, the problem found
    by a linear search over its items."""
    data = reasoning_gym.create_dataset(dataset, **settings)
    items = list(data)
    scores = []
    for out, question in zip(outputs, questions, strict=True):
        entry = next(item for item in items if item["question"].strip() == question)
        scores.append(100 * data.score_answer(answer=out.strip(), entry=entry))
    return scores


def test_settings_reach_the_dataset_and_the_problems_are_its_own() -> None:
    task = get_task("rg:basic_arithmetic?size=40&seed=3&min_terms=2&max_terms=2&max_digits=1")
    items = list(reasoning_gym.create_dataset("basic_arithmetic", size=40, seed=3, min_terms=2, max_terms=2,
                                              max_digits=1))  # fmt: skip
    assert all(item["metadata"]["num_terms"] == 2 for item in items)
    expected = {item["question"].strip(): str(item["answer"]) for item in items}
    examples = task.examples()
    assert task.kind == "numeric" and len(examples) == len(expected)
    assert {ex["input"]: ex["targets"][0] for ex in examples} == expected
    assert "min_terms=2" in task.source and task.name == "basic_arithmetic"


def test_a_closed_answer_set_is_multiple_choice_over_it() -> None:
    task = get_task("rg:syllogism?size=60")
    assert task.kind == "multiple_choice" and task.score_answer is None
    choices = set(tuple(c) for c in task.examples()["choices"])
    assert len(choices) == 1 and set(next(iter(choices))) == {"Yes", "No"}
    forced = get_task("rg:syllogism?size=60&kind=text")
    assert forced.kind == "text" and forced.score_answer is not None


def test_generated_answers_are_scored_by_the_datasets_own_score_answer() -> None:
    task = get_task("rg:gcd?size=60&seed=1&kind=numeric")
    examples = questions_of(task, seed=0)
    questions = examples["input"]
    outputs = [t[0] if i % 3 == 0 else (f" {t[0]} \n" if i % 3 == 1 else "seven") for i, t in
               enumerate(examples["targets"])]  # fmt: skip
    result = generated_result(task, examples, outputs)
    expected = reference_scores("gcd", outputs, questions, size=60, seed=1)
    assert result.metric == "score" and [p["score"] for p in result.predictions] == expected
    assert result.score == pytest.approx(sum(expected) / len(expected)) and 0 < result.score < 100
    majority = majority_result(task, seed=0)
    most = majority.predictions[0]["output"]
    assert [p["score"] for p in majority.predictions] == reference_scores(
        "gcd", [most] * len(questions), questions, size=60, seed=1
    )


def test_partial_credit_comes_from_the_dataset() -> None:
    task = get_task("rg:spell_backward?size=40")
    examples = questions_of(task, seed=0)
    outputs = [t[0][:-1] for t in examples["targets"]]  # one letter short
    result = generated_result(task, examples, outputs)
    assert [p["score"] for p in result.predictions] == reference_scores(
        "spell_backward", outputs, examples["input"], size=40, seed=0
    )


@pytest.mark.parametrize(("spec", "message"), [
    ("rg:gdc", "no dataset 'gdc'; nearest: gcd"),
    ("rg:gcd?min_valu=3", "no setting 'min_valu'; nearest: min_value"),
    ("rg:gcd?size=0", "size='0'; give a whole number in [2, 100000]"),
    ("rg:gcd?size=10&size=20", "option size is given twice"),
    ("rg:gcd?kind=essay", "kind must be one of"),
    ("rg:gcd?name=../../etc", "a task name is 1-100 letters"),
    ("rg:gcd?max_new_tokens=100000", "max_new_tokens='100000'; give a whole number in [1, 512]"),
    ("rg:basic_arithmetic?min_terms=9&max_terms=2", "reasoning-gym refused the settings"),
])  # fmt: skip
def test_bad_names_and_settings_are_refused_with_the_nearest(spec: str, message: str) -> None:
    with pytest.raises((InputError, UnknownTaskError), match=message.replace("(", r"\(").replace("[", r"\[")):
        get_task(spec)


def test_cli_eval_scores_an_rg_task_and_lists_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    spec = "rg:gcd?size=40&kind=numeric&max_new_tokens=4"
    assert main(["eval", "--model", "tiny-llama", "--task", spec, "--limit", "5", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "results.json").read_text())["tasks"]
    assert entry["metric"] == "score" and entry["n"] == 5
    task = get_task(spec)
    questions = questions_of(task, seed=0, limit=5)["input"]
    outputs = [p["output"] for p in entry["predictions"]]
    assert [p["score"] for p in entry["predictions"]] == reference_scores(
        "gcd", outputs, questions, size=40, seed=0
    )
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--task", "rg:gcdd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nearest: gcd" in err
    assert main(["tasks", "--rg", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert (
        "gcd" in listing
        and listing["gcd"]["min_value"] == reasoning_gym.create_dataset("gcd").config.min_value
    )
    assert "size" not in listing["gcd"]  # our option, not listed as the dataset's


def test_lm_eval_export_refuses_a_task_it_cannot_score(tmp_path: Path, capsys) -> None:
    assert main(["lm-eval-task", "rg:gcd?size=20&kind=numeric", "--out", str(tmp_path / "lm")]) == 2
    assert "score_answer" in capsys.readouterr().err and not (tmp_path / "lm").exists()
