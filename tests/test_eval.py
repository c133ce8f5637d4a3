"""Evaluation: metrics on hand-made cases, the model calls against transformers' own, the whole
pipeline on a hand-made model with known answers, eval mode, task ids, the report and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from asymlora.cli import main
from asymlora.data import Task, mc_record, target_record
from asymlora.data.task import VERBATIM_TEMPLATE, PromptTemplate
from asymlora.eval import (
    Report,
    TaskResult,
    continuation_logprobs,
    delta_m,
    evaluate_task,
    evaluate_tasks,
    extract_number,
    greedy_generate,
    mc_metrics,
    mc_picks,
    numbers_equal,
    rouge,
    scoring,
    summarize,
)
from asymlora.eval.scoring import _cut
from asymlora.models import load_model

PROMPTS = ["Q: What is 2 plus 2?\nA:", "Hi", "A much longer prompt, with more tokens in it than the others:"]


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2", seed=0)


# --- metrics on hand-made cases -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "expected"),
    [
        (" 109\nQ: What is", "first", "109"),
        ("It is 1,234.5 apples", "first", "1234.5"),
        ("3 + 4 = 7. So 7 and 8", "last", "8"),
        ("3 + 4 = 7.\n#### 7\nthen 9", "last", "7"),
        ("so the answer is -12, not 4", "first", "-12"),
        ("no digits here", "first", None),
        ("+5", "first", "5"),
    ],
)
def test_extract_number(text: str, position: str, expected: str | None) -> None:
    assert extract_number(text, position) == expected


def test_numbers_equal() -> None:
    assert numbers_equal("42", "42.0") and numbers_equal("1000", "1,000") and numbers_equal("-765", "-765")
    assert not numbers_equal("41", "42") and not numbers_equal(None, "42")


def test_the_three_picks_follow_lm_evals_definitions() -> None:
    # acc: the highest total; acc_norm: per character of the stripped choice; acc_bytes: per byte
    logprobs = [[-2.0, -3.0], [-1.2, -1.5], [-1.0, -1.0]]
    choices = [["a", " bbbbbbbbbb "], ["éé", "abc"], ["x", "y"]]
    assert mc_picks(logprobs, choices) == {"acc": [0, 0, 0], "acc_norm": [1, 1, 0], "acc_bytes": [1, 0, 0]}
    assert mc_metrics(logprobs, choices, [1, 0, 0]) == pytest.approx(
        {"acc": 200 / 3, "acc_norm": 200 / 3, "acc_bytes": 100.0}
    )


def test_rouge_known_values() -> None:
    assert rouge("the cat sat", ["the cat sat"]) == {"rouge1": 100.0, "rougeL": 100.0}
    scores = rouge("the cat sat", ["the cat sat down"])  # P = 1, R = 3/4 -> F = 6/7
    assert scores["rouge1"] == pytest.approx(600 / 7) and scores["rougeL"] == pytest.approx(600 / 7)
    assert rouge("sat the cat", ["the cat sat"])["rougeL"] == pytest.approx(200 / 3)  # LCS 2 of 3
    assert rouge("dogs run", ["cats", "the dog runs"])["rouge1"] == pytest.approx(
        80.0
    )  # best reference, stemmed
    assert rouge("", ["x"])["rouge1"] == 0.0


def test_summary_and_delta_m_by_hand() -> None:
    s = summarize({"a": 50.0, "b": 30.0}, {"a": 40.0, "b": 30.0})
    assert s == {"average": 40.0, "worst_task": "b", "worst": 30.0, "std": 10.0, "delta_m": 12.5}
    assert delta_m({"a": 20.0, "b": 60.0}, {"a": 40.0, "b": 40.0}) == pytest.approx(0.0)  # -50 % and +50 %
    assert summarize({"a": 1.0})["delta_m"] is None


def test_delta_m_refuses_missing_or_zero_references() -> None:
    with pytest.raises(ValueError, match="no reference score for: b"):
        delta_m({"a": 1.0, "b": 2.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="zero reference score"):
        delta_m({"a": 1.0}, {"a": 0.0})


def test_report_table_and_json(tmp_path: Path) -> None:
    results = [TaskResult("a", "multiple_choice", "acc", 50.0, 4, {"acc": 50.0, "acc_norm": 75.0}),
               TaskResult("b", "text", "rougeL", 20.0, 2, {"rouge1": 30.0, "rougeL": 20.0})]  # fmt: skip
    report = Report(results, {"a": 40.0, "b": 20.0}, {"model": "m"})
    table = report.to_markdown()
    assert "| a | multiple_choice | 4 | acc | 50.00 | acc_norm 75.0 |" in table
    assert "average 35.00 | worst b 20.00 | std 15.00 | delta-m +12.50%" in table
    assert "delta-m n/a (no reference scores given)" in Report(results).to_markdown()
    data = json.loads(report.save(tmp_path / "r" / "results.json").read_text())
    assert data["model"] == "m" and data["summary"]["worst_task"] == "b" and data["tasks"][1]["score"] == 20.0


# --- model calls against transformers -----------------------------------------------------------


def manual_logprob(model, tokenizer, prompt: str, cont: str, keep: int | None = None) -> float:
    """The pair run alone, unpadded; ``keep``: only the prompt's last ``keep`` tokens."""
    ctx = tokenizer(prompt)["input_ids"]
    ctx = ctx[-keep:] if keep is not None else ctx
    tail = tokenizer(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + tail])).logits[0].log_softmax(-1)
    return sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(tail))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_continuation_logprobs_match_an_unpadded_forward(which: str, request) -> None:
    model, tok = request.getfixturevalue(which)
    conts = [" 4", " four hundred", " x"]
    expected = [manual_logprob(model, tok, p, c) for p, c in zip(PROMPTS, conts, strict=True)]
    with torch.no_grad():
        for batch_size in (1, 3):  # padding and batching change nothing
            got = continuation_logprobs(model, tok, PROMPTS, conts, batch_size=batch_size)
            assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_choices_sharing_a_prompt_score_as_if_run_alone(which: str, request) -> None:
    """The choices of a question share one cached pass over the prompt; their scores equal those of
    each prompt + choice run whole, with and without a cache, for any batch size."""
    model, tok = request.getfixturevalue(which)
    prompts, conts = [], []
    for prompt, choices in zip(PROMPTS, [[" 4", " five", " 22 or so"], [" there"], [" yes", " no", "", " maybe"]],
                               strict=True):  # fmt: skip
        prompts += [prompt] * len(choices)
        conts += choices
    expected = [manual_logprob(model, tok, p, c) for p, c in zip(prompts, conts, strict=True)]
    assert expected[conts.index("")] == 0.0
    with torch.no_grad():
        for batch_size in (1, 3, 8):
            got = continuation_logprobs(model, tok, prompts, conts, batch_size=batch_size)
            assert got == pytest.approx(expected, abs=1e-5)
        uncached = continuation_logprobs(TaskIdWrapper(model), tok, prompts, conts, batch_size=4)
    assert uncached == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_choice_trees_score_as_each_pair_run_alone(which: str, seed: int, request) -> None:
    """(Float32 sums of long continuations agree to 1e-6 of their size.) Random questions whose prompts share a long start (run once, from a cache) or nothing, and
    whose choices share prefixes, are empty, repeat, or are long: every score equals the pair run
    alone, in any batch size and with the prompt cut to ``max_length``."""
    model, tok = request.getfixturevalue(which)
    rng = random.Random(seed)
    words = ["a", "b", "cat", "dog", "42", "4", "2", " ", "and", "the", "x y"]
    start = "Answer the question below with one of the choices, as briefly as you can. "
    prompts, conts = [], []
    for q in range(7):
        prompt = (start if q % 3 else "") + " ".join(rng.choices(words, k=rng.randint(1, 12))) + ":"
        stems = [" " + " ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(3)]
        choices = {stem + rng.choice(["", " more", "s", " and so on"]) for stem in stems for _ in range(3)}
        for choice in sorted(choices) + ["", sorted(choices)[0]]:
            prompts.append(prompt)
            conts.append(choice)
    expected = [manual_logprob(model, tok, p, c) for p, c in zip(prompts, conts, strict=True)]
    with torch.no_grad():
        for batch_size in (1, 2, 7):
            got = continuation_logprobs(model, tok, prompts, conts, batch_size=batch_size)
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-5)
        alone = continuation_logprobs(TaskIdWrapper(model), tok, prompts, conts, batch_size=3)
        assert alone == pytest.approx(expected, rel=1e-6, abs=1e-5)
        cut = continuation_logprobs(model, tok, prompts, conts, batch_size=4, max_length=32)
    longest = {p: max(len(tok(c, add_special_tokens=False)["input_ids"]) for q, c in zip(prompts, conts, strict=True)
                      if q == p) for p in prompts}  # fmt: skip
    assert max(longest.values()) < 31 < max(len(tok(p)["input_ids"]) for p in prompts)  # prompts are cut
    short = [
        manual_logprob(model, tok, p, c, keep=32 - longest[p]) for p, c in zip(prompts, conts, strict=True)
    ]
    assert cut == pytest.approx(short, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_greedy_generate_matches_transformers_generate(which: str, request) -> None:
    model, tok = request.getfixturevalue(which)
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        expected.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).lstrip())
    with torch.no_grad():
        got = greedy_generate(model, tok, PROMPTS, max_new_tokens=6, stop=(), batch_size=3)
    assert got == expected


def generate_alone(model, tok, prompt: str, max_new_tokens: int, stop: tuple[str, ...]) -> str:
    """``model.generate`` on one unpadded prompt, the text cut as ``greedy_generate`` cuts it."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    return _cut(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), stop)[0]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("packed", [True, False])
def test_batched_decoding_equals_each_question_alone(
    which: str, seed: int, packed: bool, request, monkeypatch
) -> None:
    """Packed (finished questions replaced at once by the next, a long shared start run once) or
    in left-padded batches through ``model.generate``; rows that finish early (a stop string, or
    eos), in any batch size: each text equals ``model.generate`` on that question alone, and the
    packed decoder passes the task ids to every forward."""
    monkeypatch.setattr(scoring, "PACKED_ATTENTION_SHARE", float("inf") if packed else 0.0)
    model, tok = request.getfixturevalue(which)
    rng = random.Random(seed)
    words = ["a", "b", "cat", "dog", "42", "x", "and", "the", "\n", "?", "say"]
    start = "Write the answer on one line, then stop. " if seed == 0 else ""
    prompts = [start + " ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(9)]
    stop = ("\n", "a") if seed == 0 else ("t",)
    expected = [generate_alone(model, tok, p, 7, stop) for p in prompts]
    with torch.no_grad():
        for batch_size in (1, 2, 4, 9):
            got = greedy_generate(model, tok, prompts, max_new_tokens=7, stop=stop, batch_size=batch_size)
            assert got == expected, batch_size
        if not packed:
            return
        wrapper = AdapterLikeWrapper(model)
        got = greedy_generate(wrapper, tok, prompts, max_new_tokens=7, stop=stop, batch_size=3,
                              forward_kwargs=lambda n: {"task_ids": torch.full((n,), 5)})  # fmt: skip
    assert got == expected
    assert all(ids.tolist() == [5] * batch for _, ids, batch in wrapper.calls)
    assert len(wrapper.calls) > 9  # the packed decoder ran, not one generate per batch


def test_packing_is_chosen_by_its_attention_cost(llama) -> None:
    model, _ = llama  # 4 layers of 128: a key costs 1,024 multiply-adds against ~624k per token
    short, long = [[1] * 10] * 16, [[1] * 200] * 16
    assert scoring._packing_pays(model, short, 4, 8)
    assert not scoring._packing_pays(model, long, 16, 160)  # 16 x 360 keys: 5.9M > half of 624k
    assert not scoring._packing_pays(TaskIdWrapper(model), short, 4, 8)  # no config to reckon with


class TaskIdWrapper(nn.Module):
    """Stands in for an adapter wrapper: takes ``task_ids``, records them, returns no cache."""

    def __init__(self, base: nn.Module, keep_cache: bool = False) -> None:
        super().__init__()
        self.base, self.keep_cache = base, keep_cache
        self.calls: list[tuple[bool, torch.Tensor | None, int]] = []

    def forward(self, input_ids, attention_mask=None, task_ids=None, position_ids=None, **kwargs):
        self.calls.append((self.training, task_ids, input_ids.shape[0]))
        if self.keep_cache:  # an adapter wrapper's behaviour: everything else goes to the base
            return self.base(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)  # fmt: skip
        return CausalLMOutput(logits=out.logits)


class AdapterLikeWrapper(TaskIdWrapper):
    """Like an adapter wrapper: passes everything on (the cache too), has a ``generate`` and its
    base model's ``config``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base, keep_cache=True)
        self.config = base.config

    def generate(self, *args, **kwargs):  # present only to be found; the evaluator never calls it
        raise AssertionError("generate called")


def test_generation_without_a_cache_gives_the_same_text(llama) -> None:
    model, tok = llama
    with torch.no_grad():
        cached = greedy_generate(model, tok, PROMPTS, max_new_tokens=5, stop=(), batch_size=2)
        uncached = greedy_generate(
            TaskIdWrapper(model), tok, PROMPTS, max_new_tokens=5, stop=(), batch_size=2
        )
    assert cached == uncached


def test_task_id_reaches_every_forward_and_eval_mode_is_on(llama) -> None:
    model, tok = llama
    wrapper = TaskIdWrapper(model).train()
    task = Task("t", "numeric", lambda: [target_record(f"q{i}", "1") for i in range(10)])
    evaluate_task(wrapper, tok, task, limit=2, task_id=3, batch_size=2)
    assert wrapper.calls and wrapper.training  # mode restored afterwards
    for training, task_ids, batch in wrapper.calls:
        assert not training
        assert task_ids.tolist() == [3] * batch


# --- the whole pipeline on a hand-made model with known answers ----------------------------------


class ScriptedLM(nn.Module):
    """A causal LM with known behaviour: after the last ``:`` it spells ``reply`` token by token,
    then eos. Takes input_ids / attention_mask (and anything else), returns ``.logits``, no cache."""

    def __init__(self, tokenizer, reply: str) -> None:
        super().__init__()
        self.reply = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.marker = tokenizer(":", add_special_tokens=False)["input_ids"][0]
        self.vocab = len(tokenizer)
        self.dropout = nn.Dropout(0.5)  # would scramble the logits if left on in evaluation
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            start = max(i for i, t in enumerate(ids) if t == self.marker)
            for pos in range(start, len(ids)):
                k = min(pos - start, len(self.reply) - 1)
                logits[row, pos, self.reply[k]] = 20.0
        return CausalLMOutput(logits=self.dropout(logits) + self.weight)


@pytest.fixture
def scripted(llama) -> tuple[ScriptedLM, object]:
    tok = llama[1]
    return ScriptedLM(tok, " 42\nQ: next"), tok


def test_numeric_exact_match_on_known_answers(scripted) -> None:
    model, tok = scripted
    records = [target_record("What is 6 times 7?", "42"), target_record("What is 6 plus 7?", "13")]
    task = Task("n", "numeric", lambda: records, PromptTemplate(), max_new_tokens=12)
    result = evaluate_task(model.train(), tok, task, task.examples())
    assert result.score == 50.0 and result.n == 2
    assert [p["output"] for p in result.predictions] == ["42", "42"]  # cut at the stop string "\n"
    assert model.training


def test_multiple_choice_on_known_answers(scripted) -> None:
    model, tok = scripted
    records = [mc_record("Pick:", ["7", "42", "420"], 1), mc_record("Pick again:", ["42", "43"], 1)]
    task = Task("mc", "multiple_choice", lambda: records, VERBATIM_TEMPLATE)
    result = evaluate_task(model, tok, task, task.examples(), batch_size=2)
    assert [p["pick"] for p in result.predictions] == [1, 0]
    assert result.metrics == {"acc": 50.0, "acc_norm": 50.0, "acc_bytes": 50.0}


def test_text_rouge_on_known_answers(scripted) -> None:
    model, tok = scripted
    records = [target_record("Say it:", ["42"]), target_record("Say more:", ["42 and 43"])]
    task = Task("txt", "text", lambda: records, VERBATIM_TEMPLATE)
    result = evaluate_task(model, tok, task, task.examples())
    assert result.metric == "rougeL"
    assert [p["rougeL"] for p in result.predictions] == [100.0, pytest.approx(50.0)]  # P 1, R 1/3


def test_evaluation_ignores_dropout_and_restores_train_mode(gpt2) -> None:
    model, tok = gpt2
    assert model.config.resid_pdrop > 0
    task = Task(
        "mc", "multiple_choice", lambda: [mc_record(f"q{i}:", ["a", "b", "c"], i % 3) for i in range(9)]
    )
    model.train()
    try:
        first = evaluate_task(model, tok, task, task.examples(), batch_size=4)
        second = evaluate_task(model, tok, task, task.examples(), batch_size=3)
        assert model.training
    finally:
        model.eval()
    assert first.predictions == second.predictions


def test_evaluate_tasks_passes_each_task_its_id(llama) -> None:
    model, tok = llama
    wrapper = TaskIdWrapper(model)
    tasks = [Task(n, "multiple_choice", lambda: [mc_record("x:", ["a", "b"], 0), mc_record("y:", ["a", "b"], 1)])
             for n in ("t0", "t1")]  # fmt: skip
    report = evaluate_tasks(wrapper, tok, tasks, task_ids={"t0": 0, "t1": 1}, limit=1)
    assert [r.task for r in report.results] == ["t0", "t1"]
    assert sorted({int(ids[0]) for _, ids, _ in wrapper.calls}) == [0, 1]


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_eval_writes_json_and_prints_a_table(tmp_path: Path, capsys) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "choices": ["yes", "no"], "answer": i % 2}) + "\n"
                            for i in range(10)))  # fmt: skip
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"mine": 50.0}))
    out = tmp_path / "run"
    rc = main(["eval", "--model", "tiny-llama", "--task", str(data), "--limit", "2", "--out", str(out),
               "--references", str(refs)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| mine | multiple_choice | 2 | acc |" in printed and "delta-m" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "tiny-llama" and saved["limit"] == 2 and saved["tasks"][0]["n"] == 2
    assert saved["summary"]["delta_m"] is not None and (out / "results.md").is_file()
    (line,) = (out / "tasks.jsonl").read_text().splitlines()  # one line per task, written as it finishes
    assert json.loads(line)["task"] == "mine"


def test_cli_unknown_task_is_one_line_with_the_choices(capsys) -> None:
    assert main(["eval", "--model", "tiny-llama", "--task", "winogrande"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown task 'winogrande'" in err and "social_iqa" in err


def test_cli_tasks_offline_lists_every_suite(cache: Path, capsys) -> None:
    assert main(["tasks", "--offline"]) == 0
    out = capsys.readouterr().out
    for suite in ("commonsense (8 tasks)", "math (3 tasks)", "nlp-multitask (8 tasks)", "fed-nlp (8 tasks)"):
        assert suite in out
    assert "not downloaded" in out
