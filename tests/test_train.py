"""The training loop on a tiny model: it learns, accumulation and resume are exact, the batches
are a function of (seed, step)."""

from __future__ import annotations

import json

import pytest
import torch

from asymlora import wrap
from asymlora.errors import InputError
from asymlora.train import Example, TaskMixer, TrainConfig, encode, task_probabilities, train
from asymlora.train.batches import IGNORE
from tiny_models import tiny_model, tiny_tokenizer

TASKS = [
    [Example(f"Q: {a}+{a}=", str(2 * a), 0) for a in range(20)],
    [Example(f"Say {w}:", w.upper(), 1) for w in ("cat", "dog", "sun", "map", "owl", "pen")],
]


def fresh(method="alora", router="task", dropout=0.1):
    return wrap(
        tiny_model("llama"),
        method=method,
        router=router,
        num_experts=2,
        r=4,
        dropout=dropout,
        target_modules=["q_proj", "v_proj"],
    )


def cfg(**kw):
    return TrainConfig(**{"steps": 6, "batch_size": 4, "lr": 1e-2, "seed": 3, "warmup_steps": 1} | kw)


def test_encode_masks_the_prompt_and_keeps_the_target():
    tok = tiny_tokenizer()
    e = encode(tok, Example("abcdef", "XY", 1), max_length=5)
    assert e.input_ids == tok("efXY", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e.labels[:2] == [IGNORE, IGNORE] and e.labels[2:] == e.input_ids[2:]
    assert e.task_id == 1


def test_mixer_is_a_function_of_seed_and_step_and_walks_epochs():
    a, b = TaskMixer([5, 3], [0.5, 0.5], seed=1), TaskMixer([5, 3], [0.5, 0.5], seed=1)
    batches = [a.batch(s, 4) for s in range(8)]
    assert batches == [b.batch(s, 4) for s in range(8)]
    firsts = [i for batch in batches for t, i in batch if t == 1][:3]
    assert sorted(firsts) == [0, 1, 2], "the first epoch of a task visits each example once"
    assert task_probabilities([100, 300]) == [0.25, 0.75]
    assert task_probabilities([100, 300], temperature=1e9) == pytest.approx([0.5, 0.5])


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    model = fresh()
    last = train(
        model, tiny_tokenizer(), TASKS, cfg(steps=30, batch_size=8, lr=3e-2, schedule="constant"), tmp_path
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31))
    first, final = sum(m["loss"] for m in lines[:5]) / 5, sum(m["loss"] for m in lines[-5:]) / 5
    assert final < first - 0.2, (first, final)
    cpu = last.pop("cpu_seconds")  # what the steps cost this process; also in the checkpoint
    assert last == lines[-1]
    saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["cpu_seconds"]
    assert 0 < saved <= cpu < saved + 0.5  # saved after the last step; the return counts to the end
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").is_file()
    assert not model.training, "the loop hands the model back in eval mode"


def test_gradient_accumulation_gives_the_same_weights(tmp_path):
    one, four = fresh(dropout=0.0), fresh(dropout=0.0)
    train(one, tiny_tokenizer(), TASKS, cfg(), tmp_path / "a")
    train(four, tiny_tokenizer(), TASKS, cfg(grad_accum=4), tmp_path / "b")
    for key, value in one.adapter_state_dict().items():
        torch.testing.assert_close(four.adapter_state_dict()[key], value, rtol=1e-5, atol=1e-6)


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_bit_for_bit_equal(tmp_path):
    reference = fresh()
    train(reference, tiny_tokenizer(), TASKS, cfg(), tmp_path / "straight")

    def crash_at_5(step, _):
        if step == 5:
            raise Crash

    crashed = fresh()
    with pytest.raises(Crash):
        train(crashed, tiny_tokenizer(), TASKS, cfg(save_every=2), tmp_path / "resumed", on_step=crash_at_5)
    resumed = fresh()  # a new process: fresh base, fresh adapter, state from the checkpoint (step 4)
    train(resumed, tiny_tokenizer(), TASKS, cfg(save_every=2), tmp_path / "resumed", resume=True)
    for key, value in reference.adapter_state_dict().items():
        assert torch.equal(resumed.adapter_state_dict()[key], value), key
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7)), "no step is logged twice after a resume"


def test_a_resume_on_other_training_data_is_refused(tmp_path):
    """A checkpoint records a digest of the tokenized training examples: a resume after a task's
    examples changed (same count, so the mixer counts still fit) stops before any step, and a
    checkpoint written before the digest existed still resumes."""

    def crash_at_3(step, _):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(fresh(), tiny_tokenizer(), TASKS, cfg(save_every=2), tmp_path, on_step=crash_at_3)
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    assert len(json.loads(state_file.read_text())["data"]) == 16
    edited = [TASKS[0], [Example(e.prompt.replace("Say", "Shout"), e.target, 1) for e in TASKS[1]]]
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="step 2\\) was written while training on other data"):
        train(fresh(), tiny_tokenizer(), edited, cfg(save_every=2), tmp_path, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics, "refused before anything is written"
    with pytest.raises(InputError, match="other data"):  # max_length changes the tokens trained on
        train(fresh(), tiny_tokenizer(), TASKS, cfg(save_every=2, max_length=6), tmp_path, resume=True)
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "data"}))  # an older checkpoint
    fewer = [TASKS[0][:3], TASKS[1]]  # ... still refused where the task sizes changed: its counts say so
    with pytest.raises(InputError, match="other data"):
        train(fresh(), tiny_tokenizer(), fewer, cfg(save_every=2), tmp_path, resume=True)
    train(fresh(), tiny_tokenizer(), edited, cfg(save_every=2), tmp_path, resume=True)  # same sizes: resumes


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", 0, "train.steps=0"),
        ("schedule", "step", "train.schedule='step'"),
        ("lr", -1.0, "train.lr=-1.0"),
    ],
)
def test_bad_train_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})
