"""The statistics of the comparison tables, on cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from asymlora.eval.stats import Table, draws, top_answer_share


def correct(n: int, right: set[int]) -> np.ndarray:
    return np.array([100.0 if i in right else 0.0 for i in range(n)])


def test_two_questions_one_right_give_the_whole_range():
    # replicates are 0, 50 or 100 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 100]
    iv = Table(["t"], {"m": {"t": np.array([0.0, 100.0])}}).intervals()["m"]["t"]
    assert (iv.value, iv.low, iv.high) == (50.0, 0.0, 100.0)


def test_a_constant_score_has_a_point_interval_and_the_draws_follow_the_seed():
    iv = Table(["t"], {"m": {"t": np.full(30, 100.0)}}).intervals()["m"]["t"]
    assert (iv.value, iv.low, iv.high) == (100.0, 100.0, 100.0)
    assert np.array_equal(draws({"t": 30}, 50, seed=3)["t"], draws({"t": 30}, 50, seed=3)["t"])
    assert not np.array_equal(draws({"t": 30}, 50, seed=3)["t"], draws({"t": 30}, 50, seed=4)["t"])


def test_the_interval_of_a_proportion_matches_the_normal_approximation():
    scores = correct(400, set(range(0, 400, 4)))  # 25 % right
    iv = Table(["t"], {"m": {"t": scores}}, replicates=4000).intervals()["m"]["t"]
    half = 1.96 * np.sqrt(0.25 * 0.75 / 400) * 100  # 4.24 points
    assert iv.value == 25.0
    assert abs((iv.high - iv.low) / 2 - half) < 0.6


def test_a_paired_difference_that_never_loses_excludes_zero_where_an_unpaired_view_would_not():
    base = correct(100, set(range(50)))  # 50 %
    better = correct(100, set(range(56)))  # the same 50 right, and 6 more: 56 %
    table = Table(["t"], {"base": {"t": base}, "better": {"t": better}})
    diff = table.differences("base")["better"]["t"]
    assert diff.value == pytest.approx(6.0)
    assert diff.excludes_zero and diff.low >= 1.0
    ivs = table.intervals()  # on their own the two intervals overlap widely
    assert ivs["better"]["t"].low < ivs["base"]["t"].high


def test_a_difference_that_swaps_as_many_questions_as_it_gains_includes_zero():
    a = correct(100, set(range(50)))
    b = correct(100, set(range(5, 55)))  # loses questions 0-4, gains 50-54
    diff = Table(["t"], {"a": {"t": a}, "b": {"t": b}}).differences("a")["b"]["t"]
    assert diff.value == 0.0 and diff.low < 0 < diff.high and not diff.excludes_zero


def test_seeds_are_pooled_per_question_and_the_average_is_over_tasks():
    seeds = np.array([correct(4, {0, 1}), correct(4, {0})])  # per question: 100, 50, 0, 0
    table = Table(["x", "y"], {"m": {"x": seeds, "y": np.full(3, 90.0)}})
    ivs = table.intervals()["m"]
    assert ivs["x"].value == pytest.approx(37.5)
    assert ivs["average"].value == pytest.approx((37.5 + 90.0) / 2)
    assert ivs["average"].low >= (0 + 90) / 2 and ivs["average"].high <= (100 + 90) / 2


def test_models_scored_on_different_questions_are_refused():
    with pytest.raises(ValueError, match="same questions"):
        Table(["t"], {"a": {"t": np.zeros(5)}, "b": {"t": np.zeros(6)}})


def test_top_answer_share():
    assert top_answer_share(["yes"] * 9 + ["no"]) == 90.0
    assert top_answer_share([0, 1, 2, 0]) == 50.0


def test_an_eval_report_shows_intervals_the_majority_answer_and_the_paired_difference():
    from asymlora.eval.report import Report, TaskResult

    def result(picks: list[int]) -> TaskResult:
        answers = [0] * 30 + [1] * 10  # the training majority, "yes", is right on 30 of 40
        preds = [
            {"pick": p, "pick_norm": p, "answer": a, "choice": ["yes", "no"][p]}
            for p, a in zip(picks, answers, strict=True)
        ]
        score = 100 * sum(p == a for p, a in zip(picks, answers, strict=True)) / 40
        return TaskResult("t", "multiple_choice", "acc", score, 40, {"acc": score}, preds)

    model = result([0] * 30 + [1] * 10)  # right on all 40
    report = Report([model], majority=Report([result([0] * 40)]))
    stats = report.statistics()
    assert stats["majority_answer"]["t"]["value"] == 75.0
    diff = stats["difference_vs_majority"]["average"]
    assert diff["value"] == 25.0 and diff["excludes_zero"]
    assert stats["top_answer_share"]["t"] == 75.0
    table = report.to_markdown()
    assert "| t | multiple_choice | 40 | acc | 100.00 | [100.0, 100.0] | 75 | 75.00 | +25.0* [" in table


def test_the_digests_that_pair_runs_and_guard_resumes_are_fixed_values():
    """Pinned: results.json files and checkpoints written on one machine are checked on another,
    so a digest must not depend on the process, the platform or a library's iteration order."""
    from asymlora.data.clients import ClientData, clients_digest
    from asymlora.data.task import Example
    from asymlora.errors import InputError
    from asymlora.eval.report import check_same_questions, questions_digest
    from asymlora.train.batches import Encoded, encoded_digest

    row = {
        "input": "Is ice cold?",
        "choices": ["yes", "no"],
        "answer": 0,
        "targets": ["yes"],
        "prompt": "Q: Is ice cold?\nA:",
    }
    assert questions_digest([row]) == "64b2f673d69927f8"
    assert (
        questions_digest([dict(reversed(list(row.items())))]) == "64b2f673d69927f8"
    )  # key order is irrelevant
    assert (
        encoded_digest([[Encoded([1, 2, 3], [-100, 2, 3], 0)], [Encoded([7], [7], 1)]]) == "89d4783f3741741e"
    )
    client = ClientData("c0", [], [1.0], [[Example("Q: 1+1=", " 2", 0)]])
    assert clients_digest([client]) == "1dcff6cbbb65f7d3"
    old, new = {"task": "t", "n": 4}, {"task": "t", "n": 4, "questions": "64b2f673d69927f8"}
    check_same_questions({"old": old, "new": new})  # no digest on one side: the counts agree
    with pytest.raises(InputError, match="task 't': old and fewer were scored on different questions"):
        check_same_questions({"old": old, "fewer": {"task": "t", "n": 3}})
