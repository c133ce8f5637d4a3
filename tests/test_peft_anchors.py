"""PEFT's own Lily and Poly as anchors in the compare harness (adapters/peft_anchors.py): run by
PEFT on the same data, budget and evaluation as our methods, counted by PEFT, Poly routed by each
task's position, a stopped cell resumed to the result of one that never stopped, bad names refused
in one line. Tiny random-init models and JSONL tasks."""

from __future__ import annotations

import _thread
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

from asymlora import wrap  # noqa: E402
from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.adapters.io import WEIGHTS_FILE  # noqa: E402
from asymlora.adapters.model import planned_size  # noqa: E402
from asymlora.cli import main  # noqa: E402
from asymlora.errors import InputError  # noqa: E402
from asymlora.eval.runner import evaluate_task  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.recipes.compare import compare  # noqa: E402
from asymlora.recipes.multitask import load_config, prepare, train_and_report  # noqa: E402
from asymlora.train import Example, TrainConfig, train  # noqa: E402
from asymlora.train.loop import encode_tasks, make_mixer  # noqa: E402
from tiny_models import lines_in, randomize_adapters, tiny_model, tiny_tokenizer  # noqa: E402

TINY = ["adapter.r=4", "adapter.target_modules=['q_proj','v_proj']", "eval.limit=4", "train.batch_size=4",
        "train.max_length=48", "eval.batch_size=4"]  # fmt: skip


@pytest.fixture
def task_files(tmp_path: Path) -> list[str]:
    """A multiple-choice task and a generated one."""
    colors, double = tmp_path / "colors.jsonl", tmp_path / "double.jsonl"
    colors.write_text("".join(
        json.dumps({"prompt": f"Item {i} is {c}. Its color:", "choices": ["red", "green", "blue"], "answer": i % 3}) + "\n"
        for i, c in enumerate(["red", "green", "blue"] * 8)
    ))  # fmt: skip
    double.write_text(
        "".join(json.dumps({"prompt": f"Twice {i} is", "target": str(2 * i)}) + "\n" for i in range(24))
    )
    return [str(colors), str(double)]


def grid(tasks: list[str], *extra: str) -> list[str]:
    sets = [arg for kv in [*TINY, *extra] for arg in ("--set", kv)]
    return ["compare", "--model", "tiny-llama", "--tasks", ",".join(tasks), *sets]


def test_compare_runs_lily_and_poly_beside_alora_with_peft_counts(tmp_path, task_files, capsys):
    """A grid of alora and the two anchors runs to its table; each anchor's parameter count is
    PEFT's own count of the adapter its cell saved, at the smallest rank with at least alora's."""
    out = tmp_path / "cmp"
    methods = ["alora", "peft:lily", "peft:poly"]
    assert (
        main(
            [
                *grid(task_files),
                "--steps",
                "2",
                "--methods",
                ",".join(methods),
                "--seeds",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["method_statistics"]) == methods  # scored on the same questions, paired
    table = (out / "results.md").read_text()
    assert "| peft:lily | " in table and "| peft:poly | " in table and "train CPU s/step" in table
    base, _ = load_model("tiny-llama")
    cell_cfg = load_config(out / "peft-poly" / "seed-0" / "config.yaml").adapter
    alora = planned_size(base, replace(cell_cfg, method="alora"))
    assert summary["methods"]["alora"]["trainable_parameters"] == alora
    for method in methods[1:]:
        cell = out / method.replace(":", "-") / "seed-0"
        peft = PeftModel.from_pretrained(load_model("tiny-llama")[0], cell / "adapter", is_trainable=True)
        count = peft.get_nb_trainable_parameters()[0]
        assert summary["methods"][method]["trainable_parameters"] == count >= alora
        settings = summary["anchor_settings"][method]
        assert settings["r"] == peft.peft_config["default"].r
        assert f"{method} is PEFT's own method, run by PEFT with r={settings['r']}" in table
        smaller = wrap(load_model("tiny-llama")[0], load_config(cell / "config.yaml").adapter, n_tasks=2)
        assert smaller.trainable_parameters().trainable == count  # rebuilt: the same size
        step = summary["methods"][method]["train_cpu_seconds_per_step"]
        assert step["mean"] > 0 and step["n"] == 1
        result = json.loads((cell / "results.json").read_text())
        assert all(t["predictions"] for t in result["tasks"]) and result["trainable_parameters"] == count
        assert "PEFT's own methods" in result["no_peft_export"]
    poly = summary["anchor_settings"]["peft:poly"]
    assert poly["n_tasks"] == 2 and poly["n_skills"] == cell_cfg.num_experts
    capsys.readouterr()
    assert main(["export", str(out / "peft-lily" / "seed-0"), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "save_pretrained output already" in err


def test_a_rank_lower_would_hold_fewer_parameters_than_alora():
    """'The smallest rank with at least alora's': one less falls short."""
    from asymlora.adapters import AdapterConfig
    from asymlora.adapters.peft_anchors import anchor_rank

    for method in ("peft:lily", "peft:poly"):
        cfg = AdapterConfig(method=method, r=4, num_experts=3, target_modules=["q_proj", "v_proj"])
        rank = anchor_rank(tiny_model(), cfg, n_tasks=2)
        at = wrap(tiny_model(), cfg, n_tasks=2).trainable_parameters().trainable
        goal = planned_size(tiny_model(), replace(cfg, method="alora"))
        assert at >= goal
        if rank > 1:
            from asymlora.adapters.peft_anchors import _get_peft_model

            below = _get_peft_model(tiny_model(), cfg, rank - 1, 2).get_nb_trainable_parameters()[0]
            assert below < goal


def poly(n_tasks: int):
    return wrap(
        tiny_model(),
        method="peft:poly",
        num_experts=3,
        r=4,
        target_modules=["q_proj", "v_proj"],
        n_tasks=n_tasks,
    )


def router_logits(model) -> torch.Tensor:
    """Every Poly layer's (tasks, skills) router logits, stacked."""
    return torch.stack([p.detach().clone() for n, p in model.named_parameters() if "poly_router" in n])


def test_training_routes_poly_by_the_position_of_each_examples_task(tmp_path):
    """One step of one example: only the router row of the task the mixer drew moves (a model
    built for 3 tasks trained on 2: the third never moves)."""
    tasks = [
        [Example(f"Q: {a}+{a}=", str(2 * a), 0) for a in range(6)],
        [Example(f"Say {w}:", w.upper(), 1) for w in ("cat", "dog", "sun")],
    ]
    cfg = TrainConfig(steps=1, batch_size=1, lr=0.1, seed=3)
    drawn = make_mixer(encode_tasks(tiny_tokenizer(), tasks, cfg.max_length), cfg).batch(0, 1)[0][0]
    model = poly(n_tasks=3)
    randomize_adapters(model)  # B starts at zero, which gives the router no gradient
    before = router_logits(model)
    train(model, tiny_tokenizer(), tasks, cfg, tmp_path)
    moved = (router_logits(model) != before).any(dim=2).any(dim=0)  # per task: (layers, tasks, skills)
    assert moved.tolist() == [t == drawn for t in range(3)]


def write_task(path: Path, size: int = 8) -> str:
    rows = [
        {"prompt": f"Q{i}: pick", "choices": ["ant", "bee", "cat", "dog"], "answer": i % 4}
        for i in range(size)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@torch.no_grad()
def route_tasks_to_skills(model) -> None:
    """Task 0 to skill 0, whose B is zero (the base model), task 1 to skill 1, a large update."""
    for name, p in model.named_parameters():
        if "poly_router" in name:  # (tasks, skills) logits; evaluation takes their sigmoid
            p.fill_(-30.0)
            p[0, 0], p[1, 1] = 30.0, 30.0
        elif "poly_lora_B" in name:  # (splits, skills, r, d_out)
            p.zero_()
            p[:, 1] = torch.randn(p[:, 1].shape, generator=torch.Generator().manual_seed(0)) * 4


def test_evaluation_routes_poly_by_each_tasks_position(tmp_path):
    """Two tasks that pose the same questions, routed by Poly to different skills: the run's
    results score each as PEFT's Poly does given the task's position (0 and 1), and the two differ."""
    files = [write_task(tmp_path / "same.jsonl"), write_task(tmp_path / "twin.jsonl")]
    cfg = load_config(None, ["model=tiny-llama", f"data.tasks={files}", "adapter.method=peft:poly",
                             "train.steps=1", "train.lr=1e-9", f"output_dir={tmp_path / 'run'}", *TINY,
                             "eval.limit=8"])  # fmt: skip
    tasks, examples, model, tokenizer = prepare(cfg)
    route_tasks_to_skills(model)
    train_and_report(cfg, model, tokenizer, tasks, examples, resume=False, log=lambda _: None)
    picks = {t["task"]: [p["pick"] for p in t["predictions"]] for t in json.loads((tmp_path / "run" / "results.json").read_text())["tasks"]}  # fmt: skip
    own = {  # PEFT's own model, given task i's id through its own forward
        task.name: [p["pick"] for p in evaluate_task(model.peft_model, tokenizer, task, limit=8, batch_size=4,
                                                     max_length=48, progress_bar=False,
                                                     forward_kwargs=lambda n, i=i: {"task_ids": torch.full((n,), i)}).predictions]
        for i, task in enumerate(tasks)
    }  # fmt: skip
    assert picks == own
    assert picks["same"] != picks["twin"], "the two routes give the same answers: nothing was tested"
    with pytest.raises(InputError, match="routes by task: pass task_ids"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def interrupt_when(path: Path, lines: int, done: threading.Event, lock: threading.Lock) -> threading.Thread:
    """A thread that stops the main thread (KeyboardInterrupt, as Ctrl-C would) once ``path`` has
    ``lines`` lines, unless ``done`` is set first."""

    def watch() -> None:
        while not done.is_set():
            if lines_in(path) >= lines:
                with lock:
                    if not done.is_set():
                        _thread.interrupt_main()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("method", ["peft:lily", "peft:poly"])
def test_a_stopped_anchor_cell_resumes_to_the_result_of_one_that_never_stopped(tmp_path, task_files, method):
    cfg = load_config(None, ["model=tiny-llama", f"data.tasks={task_files}", "train.steps=8",
                             "train.save_every=1", *TINY])  # fmt: skip
    quiet = {"log": lambda _: None}
    compare(cfg, [method], [0], tmp_path / "straight", **quiet)
    stopped = tmp_path / "stopped"
    done, lock = threading.Event(), threading.Lock()
    watcher = interrupt_when(stopped / method.replace(":", "-") / "seed-0" / "metrics.jsonl", 2, done, lock)
    with pytest.raises(KeyboardInterrupt):
        try:
            compare(cfg, [method], [0], stopped, **quiet)
        finally:
            with lock:
                done.set()
    watcher.join()
    cell = stopped / method.replace(":", "-") / "seed-0"
    state = json.loads((cell / "checkpoint" / "trainer_state.json").read_text())
    assert not (cell / "results.json").exists() and state["step"] < 8, "it ran to the end: nothing was tested"
    compare(cfg, [method], [0], stopped, **quiet)
    got, want = (
        json.loads((o / method.replace(":", "-") / "seed-0" / "results.json").read_text())
        for o in (stopped, tmp_path / "straight")
    )
    assert [t["predictions"] for t in got["tasks"]] == [t["predictions"] for t in want["tasks"]]
    resumed, straight = (
        read_tensors(o / method.replace(":", "-") / "seed-0" / "adapter" / WEIGHTS_FILE)
        for o in (stopped, tmp_path / "straight")
    )
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("alora,peft:nope", "--methods: unknown peft:nope; choose from lora, alora, hydralora, mola, factored, peft:lily, peft:poly"),
        ("peft:xlora", "--methods: peft:xlora is not supported: PEFT's X-LoRA mixes LoRA experts trained beforehand"),
        ("lora@peft:lily", "--methods: lora@peft:lily: m@other sizes one of lora, alora"),
    ],
)  # fmt: skip
def test_bad_anchor_names_are_one_line_listing_the_choices(tmp_path, task_files, capsys, methods, message):
    assert main([*grid(task_files), "--methods", methods, "--seeds", "0", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_a_config_naming_an_unknown_peft_method_is_one_line(tmp_path, task_files, capsys):
    args = ["train", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--out", str(tmp_path / "r"),
            "--set", "adapter.method=peft:nope"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "peft:lily, peft:poly" in err


def test_poly_refuses_activation_checkpointing_in_one_line(tmp_path, task_files, capsys):
    args = ["train", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--out", str(tmp_path / "r"),
            "--steps", "1", "--set", "adapter.method=peft:poly", "--set", "train.activation_checkpointing=true",
            *[a for kv in TINY for a in ("--set", kv)]]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.activation_checkpointing=false" in err
