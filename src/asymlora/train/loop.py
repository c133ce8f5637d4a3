"""The training loop: mixed-task batches, gradient accumulation, checkpoints, exact resume, and
data-parallel processes under ``torchrun`` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..adapters.gates import GateStats, balance_loss
from ..adapters.model import AsymLoraModel
from ..checkpoint_signal import checkpoint_requests
from ..errors import InputError, TrainingDivergedError
from ..models import accepts_keyword, base_weight
from ..progress import progress_bar
from ..runfolder import counted_cpu, json_line, repair_jsonl
from .activations import set_activation_checkpointing
from .batches import (
    IGNORE,
    Encoded,
    Example,
    TaskMixer,
    collate,
    encode,
    encoded_digest,
    hash_seed,
    labelled_tail,
    length_groups,
    shard,
    task_probabilities,
)
from .checkpoint import find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .processes import ALONE, Process, init_process

SCHEDULES = ("constant", "linear", "cosine")
MAX_SETTING = 1e6  # the largest max_grad_norm and mixing_temperature: past it, "off" or "uniform"
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step, over all processes"})
    grad_accum: int = field(
        default=1, metadata={"help": "micro-batches per step (divides batch_size and the per-process batch)"}
    )
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate, in (0, 1]"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW's decoupled weight decay, in [0, 10], with lr x weight_decay < 1"},
    )
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up (>= 0)"})
    schedule: str = field(
        default="linear", metadata={"help": "constant | linear | cosine decay after warm-up"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradient norm (0: off), at most 1e6"}
    )
    max_length: int = field(
        default=256, metadata={"help": "tokens per example (prompt is cut from the left)"}
    )
    mixing_temperature: float = field(
        default=1.0,
        metadata={"help": "task sampling p ~ n^(1/T), T in (0, 1e6]: 1 proportional, large -> uniform"},
    )
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    log_every: int = 1
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast on GPUs that have it, over a float32 base) | fp32 | bf16"},
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each block's activations in the backward pass: far less memory, ~1/3 more time"
        },
    )
    seed: int = 0
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0: one per core); --threads wins over it"}
    )

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, key) < 1:
                raise InputError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("lr", "weight_decay", "max_grad_norm", "mixing_temperature"):
            if not math.isfinite(getattr(self, key)):
                raise InputError(f"train.{key}={getattr(self, key)} must be a finite number")
        for key in ("warmup_steps", "save_every", "threads", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise InputError(f"train.{key}={getattr(self, key)} must be >= 0")
        if not 0 < self.lr <= 1:  # AdamW moves each weight by about lr per step
            raise InputError(f"train.lr={self.lr} must be in (0, 1]")
        if self.schedule not in SCHEDULES:
            raise InputError(f"train.schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"train.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if not 0 < self.mixing_temperature <= MAX_SETTING:
            raise InputError(
                f"train.mixing_temperature={self.mixing_temperature} must be in (0, {MAX_SETTING:g}]"
            )
        if self.max_grad_norm > MAX_SETTING:
            raise InputError(
                f"train.max_grad_norm={self.max_grad_norm} must be at most {MAX_SETTING:g} (0: off)"
            )
        if self.weight_decay > 10 or self.lr * self.weight_decay >= 1:
            raise InputError(
                f"train.weight_decay={self.weight_decay} must be at most 10 with lr x weight_decay < 1 "
                f"(AdamW multiplies every weight by 1 - lr x weight_decay = {1 - self.lr * self.weight_decay:.3g} "
                "each step)"
            )
        if self.batch_size % self.grad_accum:
            raise InputError(
                f"train.grad_accum={self.grad_accum} must divide train.batch_size={self.batch_size} "
                "(each step's batch is split into that many equal micro-batches)"
            )


def decay(schedule: str, progress: float) -> float:
    """The lr factor of ``schedule`` (one of SCHEDULES) at ``progress`` in [0, 1]."""
    if schedule == "constant":
        return 1.0
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return decay(cfg.schedule, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))


def wants_autocast(precision: str, device_type: str, bf16_supported: bool, base_dtype: torch.dtype) -> bool:
    """Whether a training forward runs under bfloat16 autocast: always under ``bf16``; under
    ``auto`` only on a GPU that has bfloat16 and over a float32 base. A bfloat16 or float16 base
    already computes in its dtype (the adapters compute in their input's), and autocast over a
    bfloat16 base measured 1.19 x the step time and 1.78 x the activation memory of a 7B step on an
    H200 (docs/performance.md, "Paper scale")."""
    if precision == "auto":
        return device_type == "cuda" and bf16_supported and base_dtype == torch.float32
    return precision == "bf16"


def autocast_for(cfg: TrainConfig, device: torch.device, model):
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    enabled = wants_autocast(cfg.precision, device.type, bf16, base_weight(model).dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def token_loss_sum(model: AsymLoraModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of a collated (left-padded) batch.

    The vocabulary logits are computed only over the last ``labelled_tail`` columns, where the
    targets are (``logits_to_keep``): for short answers after long prompts most of the LM head's
    work and memory is skipped, and the loss is the same as over every column."""
    labels = batch["labels"]
    keep = labelled_tail(labels)
    trim = {"logits_to_keep": keep} if accepts_keyword(model, "logits_to_keep") else {}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        task_ids=batch["task_ids"],
        **trim,
    ).logits[:, -keep:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        labels[:, labels.shape[1] - keep + 1 :].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def all_sum(value: torch.Tensor, proc: Process) -> torch.Tensor:
    if proc.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def encode_tasks(tokenizer, examples: Sequence[Sequence[Example]], max_length: int) -> list[list[Encoded]]:
    """Tokenize every task's examples once (one list per task id)."""
    return [[encode(tokenizer, ex, max_length) for ex in task] for task in examples]


def make_mixer(encoded: Sequence[Sequence[Encoded]], cfg: TrainConfig, seed: int | None = None) -> TaskMixer:
    sizes = [len(t) for t in encoded]
    return TaskMixer(
        sizes, task_probabilities(sizes, cfg.mixing_temperature), cfg.seed if seed is None else seed
    )


def make_optimizer(
    model: AsymLoraModel, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), params


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def optimizer_step(
    model: AsymLoraModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    encoded: Sequence[Sequence[Encoded]],
    mixer: TaskMixer,
    cfg: TrainConfig,
    step: int,
    pad_id: int,
    proc: Process = ALONE,
    gates: GateStats | None = None,
) -> dict:
    """Global batch ``step``: forward, backward (accumulated, summed over processes), clip, AdamW.
    ``gates``: where the learned routers' gates over the step's tokens (all processes') are added."""
    torch.manual_seed(hash_seed(mixer.seed, proc.rank, step))  # dropout: a function of (seed, rank, step)
    picks = shard(mixer.batch(step, cfg.batch_size), proc.rank, proc.world_size)
    items = [encoded[task][index] for task, index in picks]
    loss, balance = _accumulate(model, items, cfg, proc, pad_id, params[0].device, gates)
    n_tokens = sum(len(e.input_ids) for e in items) * proc.world_size  # processed (not padded) tokens
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, step)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            f"step {step + 1}: the loss is {loss:.4g} and the gradient norm {grad_norm:.4g} "
            "(not finite); the step was not applied"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "step": step + 1,
        "loss": loss,
        **({} if balance is None else {"balance_kl": balance}),
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "tokens": n_tokens,
    }


def local_train(
    model: AsymLoraModel, encoded: Sequence[Sequence[Encoded]], cfg: TrainConfig, seed: int, pad_id: int
) -> list[dict]:
    """``cfg.steps`` steps with a fresh optimizer and no files: a federated client's local round.
    Trains the parameters that have ``requires_grad``; the batches are a function of ``seed``."""
    optimizer, params = make_optimizer(model, cfg)
    mixer = make_mixer(encoded, cfg, seed)
    model.train()
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    history = [
        optimizer_step(model, optimizer, params, encoded, mixer, cfg, step, pad_id)
        for step in range(cfg.steps)
    ]
    model.eval()
    return history


@torch.no_grad()
def validation_loss(
    model: AsymLoraModel, tokenizer, examples: Sequence[Example], cfg: TrainConfig
) -> tuple[float, int]:
    """(summed next-token loss, target tokens) of ``examples``, computed as the training loss is
    (``cfg.max_length``, precision), in micro-batches of the training's size, without gradients."""
    items = [encode(tokenizer, ex, cfg.max_length) for ex in examples]
    per, pad_id, device = cfg.batch_size // cfg.grad_accum, pad_id_of(tokenizer), base_weight(model).device
    total, tokens = 0.0, 0
    for start in range(0, len(items), per):
        for group in length_groups(items[start : start + per]):
            chunk = {k: v.to(device) for k, v in collate(group, pad_id).items()}
            tokens += int((chunk["labels"][:, 1:] != IGNORE).sum())
            with autocast_for(cfg, device, model):
                total += float(token_loss_sum(model, chunk))
    return total, tokens


@dataclass(frozen=True)
class Evaluation:
    """Evaluation during training: ``run(step)`` scores the model (in eval mode) after every
    ``every``-th step before the last (a recipe scores the last itself) and returns named numbers,
    which ``log_evaluation`` writes."""

    every: int
    run: Callable[[int], dict[str, float]]


def log_evaluation(run_dir: Path | None, step: int, scores: dict[str, float], writer=None) -> None:
    """An evaluation's numbers into ``run_dir``'s ``metrics.jsonl`` as ``{"step", "eval": {...}}``
    (None: not there) and, with a TensorBoard ``writer``, as ``eval/<name>``."""
    if run_dir is not None:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json_line({"step": step, "eval": scores}))
    if writer is not None:
        for name, value in scores.items():
            writer.add_scalar(f"eval/{name}", value, step)


def _evaluate(evaluation: Evaluation, model: AsymLoraModel, step: int, run_dir: Path, writer, bar) -> None:
    model.eval()
    try:
        scores = evaluation.run(step)
    finally:
        model.train()
    log_evaluation(run_dir, step, scores, writer)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if "/" not in k)
    bar.write(f"step {step} evaluation: {shown}", file=sys.stderr)


def train(
    model: AsymLoraModel,
    tokenizer,
    examples: Sequence[Sequence[Example]],
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    evaluation: Evaluation | None = None,
) -> dict:
    """Train ``model``'s adapters on the tasks' examples (one list per task id) for ``cfg.steps``.

    Writes ``metrics.jsonl`` and ``checkpoint/`` under ``run_dir``. With ``resume`` it continues
    from the checkpoint there and ends with the weights an uninterrupted run would have. Returns the
    last step's metrics and ``cpu_seconds``: this process's CPU time for all the steps, carried
    across resumes by the checkpoints (None where a checkpoint written before it was counted).
    ``evaluation`` runs on rank 0 only, before the step's checkpoint (a resume from an earlier
    checkpoint drops its record and evaluates that step again); the other ranks wait for it."""
    proc = init_process()
    run_dir = Path(run_dir)
    encoded = encode_tasks(tokenizer, examples, cfg.max_length)
    mixer = make_mixer(encoded, cfg)
    optimizer, params = make_optimizer(model, cfg)
    local_batch = len(shard(list(range(cfg.batch_size)), proc.rank, proc.world_size))
    if local_batch % cfg.grad_accum:
        raise InputError(
            f"the per-process batch {local_batch} is not divisible by train.grad_accum={cfg.grad_accum}"
        )

    start, cpu_before = 0, 0.0
    gates = gate_stats(model)  # the learned routers' gates since the last metrics record
    checkpoint = find_checkpoint(run_dir / "checkpoint") if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        start, mixer.counts = check_resumable(
            state, cfg, len(encoded), checkpoint, encoded_digest(encoded), mixer
        )
        cpu_before = counted_cpu(state.get("cpu_seconds"))
        restore_gates(gates, state, checkpoint)
    elif resume and proc.main:
        print(f"no checkpoint in {run_dir}: starting from step 0")
    metrics_path = run_dir / "metrics.jsonl"
    if proc.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        repair_jsonl(metrics_path, lambda record: _kept_on_resume(record, start, cfg.steps))
    writer = tensorboard_writer(run_dir) if proc.main else None

    pad_id, data = pad_id_of(tokenizer), encoded_digest(encoded)
    model.train()
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    bar = progress_bar(total=cfg.steps, initial=start, desc="train", enabled=proc.main)
    last = {}
    t0, tokens_seen, cpu0 = time.perf_counter(), 0, time.process_time()
    saved = start if checkpoint is not None else None
    # the bar and the writer are closed on an error too, before it is printed; kill -USR1 asks
    # for a checkpoint after the current step
    with bar, writer or nullcontext(), checkpoint_requests() as asked:
        for step in range(start, cfg.steps):
            try:
                last = optimizer_step(
                    model, optimizer, params, encoded, mixer, cfg, step, pad_id, proc, gates
                )
            except TrainingDivergedError as err:
                kept = (
                    f"{run_dir / 'checkpoint'} keeps step {saved}"
                    if saved is not None
                    else "no checkpoint was saved"
                )
                raise TrainingDivergedError(f"{err}; {kept}") from None
            tokens_seen += last.pop("tokens")
            last["tokens_per_s"] = tokens_seen / (time.perf_counter() - t0)
            done = last["step"]
            if proc.main:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log_step(metrics_path, writer, last, gates)
                if evaluation is not None and done % evaluation.every == 0 and done < cfg.steps:
                    _evaluate(evaluation, model, done, run_dir, writer, bar)
                on_request = asked()
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or on_request:
                    cpu = _cpu_total(cpu_before, cpu0)
                    scalars = {"step": done, "mixer_counts": mixer.counts, "cpu_seconds": cpu, "data": data}
                    if gates is not None:  # the totals of a logging interval not yet written
                        scalars["router_totals"] = gates.state()
                    save_checkpoint(run_dir / "checkpoint", model, optimizer, scalars)
                    saved = done
                    if on_request:
                        bar.write(
                            f"checkpoint at step {done} (asked for by a signal): {run_dir / 'checkpoint'}",
                            file=sys.stderr,  # beside the bar
                        )
            if on_step is not None:
                on_step(done, last)
    if proc.world_size > 1:
        dist.barrier()
    model.eval()
    return {**last, "cpu_seconds": _cpu_total(cpu_before, cpu0)}


def gate_stats(model) -> GateStats | None:
    """Where a model's learned routers add up their gates (None: it has none)."""
    return model.gate_stats() if isinstance(model, AsymLoraModel) else None


def restore_gates(gates: GateStats | None, state: dict, checkpoint: Path) -> None:
    """The router totals of the logging interval a checkpoint was written in (a checkpoint without
    them, written before they were kept, starts the interval at zero)."""
    if gates is None or "router_totals" not in state:
        return
    try:
        gates.load(state["router_totals"])
    except ValueError as err:
        raise InputError(f"{checkpoint}: not a checkpoint of this run ({err})") from None


def log_step(metrics_path: Path, writer, record: dict, gates: GateStats | None) -> None:
    """A step's numbers into metrics.jsonl and TensorBoard (``train/<name>``), with, for learned
    routers, each module's gate usage and entropy since the last record (``router``:
    ``router/usage/<module>/expert_<k>``, ``router/entropy/<module>``), whose totals then restart."""
    scalars = {k: v for k, v in record.items() if k != "step"}
    if gates is not None:
        record = {**record, "router": gates.summary()}
        gates.reset()
    with metrics_path.open("a") as f:
        f.write(json_line(record))
    if writer is None:
        return
    step = record["step"]
    for key, value in scalars.items():
        writer.add_scalar(f"train/{key}", value, step)
    for module, seen in record.get("router", {}).items():
        for k, share in enumerate(seen["usage"]):
            writer.add_scalar(f"router/usage/{module}/expert_{k}", share, step)
        writer.add_scalar(f"router/entropy/{module}", seen["entropy"], step)


def _kept_on_resume(record: dict, start: int, steps: int) -> bool:
    """Whether a metrics.jsonl record stays when the run continues from step ``start``: those of
    the steps done, but not the final evaluation (a recipe's, after the last step), which runs again."""
    step = record.get("step")
    return isinstance(step, int) and step <= start and not ("eval" in record and step == steps)


def _cpu_total(before: float | None, since: float) -> float | None:
    return None if before is None else before + time.process_time() - since


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into ``run_dir/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _accumulate(
    model,
    items: list[Encoded],
    cfg: TrainConfig,
    proc: Process,
    pad_id: int,
    device,
    gates: GateStats | None = None,
) -> tuple[float, float | None]:
    """Forward and backward over the micro-batches, each run as groups of similar length; the
    gradient is that of the mean token loss over the whole global batch, whatever the split into
    processes, micro-batches and groups. Returns that loss and, with ``adapter.balance_loss`` > 0,
    the balance KL: each group's (over its real tokens), weighted by its share of the target
    tokens as its language-model loss is; the gradient is that of loss + balance_loss * KL."""
    per = len(items) // cfg.grad_accum
    chunks = [
        collate(group, pad_id)
        for i in range(cfg.grad_accum)
        for group in length_groups(items[i * per : (i + 1) * per])
    ]
    targets = [int((c["labels"][:, 1:] != IGNORE).sum()) for c in chunks]
    total_tokens = int(all_sum(torch.tensor(float(sum(targets))), proc).item())
    coef = model.adapter_config.balance_loss
    step_gates = gates.empty() if gates is not None else None
    loss_sum, kl_sum = 0.0, 0.0
    for chunk, tokens in zip(chunks, targets, strict=True):
        chunk = {k: v.to(device) for k, v in chunk.items()}
        with autocast_for(cfg, device, model), _gate_record(model, chunk, step_gates, coef) as seen:
            loss = token_loss_sum(model, chunk)
        objective = loss
        if coef:
            kl = balance_loss(seen.usage)
            objective = loss + coef * tokens * kl
            kl_sum += float(kl.detach()) * tokens
        (objective / max(total_tokens, 1)).backward()
        loss_sum += float(loss.detach())
        if step_gates is not None:
            step_gates.add(seen)
    if proc.world_size > 1:
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                all_sum(p.grad, proc)
    if gates is not None:
        gates.totals += all_sum(step_gates.totals, proc)
    return _per_token(loss_sum, total_tokens, proc), (
        _per_token(kl_sum, total_tokens, proc) if coef else None
    )


def _per_token(local_sum: float, total_tokens: int, proc: Process) -> float:
    """A sum over this process's tokens, summed over the processes, per target token."""
    return float(all_sum(torch.tensor(local_sum, dtype=torch.float64), proc)) / max(total_tokens, 1)


def _gate_record(model, chunk: dict[str, torch.Tensor], gates: GateStats | None, coef: float):
    """The learned routers' gates of this micro-batch's real tokens, recorded where they are
    logged (``gates``) or balanced (``coef`` > 0); else nothing is recorded."""
    if gates is None and not coef:
        return nullcontext()
    return model.recording_gates(chunk["attention_mask"], keep_graph=bool(coef))


def resume_point(run_dir: str | Path, cfg: TrainConfig, n_tasks: int) -> int:
    """The step a resume in ``run_dir`` continues from (0 without a checkpoint), its checkpoint
    checked as ``train`` checks it, for a recipe to refuse a bad one before writing anything."""
    checkpoint = find_checkpoint(Path(run_dir) / "checkpoint")
    if checkpoint is None:
        return 0
    return check_resumable(read_state(checkpoint), cfg, n_tasks, checkpoint)[0]


def check_resumable(
    state: dict,
    cfg: TrainConfig,
    n_tasks: int,
    folder: Path,
    data: str | None = None,
    mixer: TaskMixer | None = None,
) -> tuple[int, list[int]]:
    """(step, mixer counts) of a checkpoint's state, refused unless this run could have written
    it: a step within ``cfg.steps``, one count per task, ``step * batch_size`` examples drawn, and
    the same training data: the same ``encoded_digest`` (``data``, where the checkpoint has one)
    and the counts that ``mixer``'s task sizes draw in that many steps (checkpoints of any age)."""
    step, counts = state["step"], state["mixer_counts"]
    other_data = data is not None and state.get("data") not in (None, data)
    if not other_data and mixer is not None and step <= cfg.steps and len(counts) == n_tasks:
        other_data = mixer.counts_after(step, cfg.batch_size) != list(counts)
    if other_data:
        raise InputError(
            f"{folder}: this checkpoint (step {step}) was written while training on other data: the tasks' "
            "examples, the tokenizer or train.max_length changed since",
            hint="restore the data the run started with, or give --overwrite to start again",
        )
    if step > cfg.steps or len(counts) != n_tasks or sum(counts) != step * cfg.batch_size:
        raise InputError(
            f"{folder}: a checkpoint at step {step} with {len(counts)} task(s) and {sum(counts)} examples "
            f"drawn is not one of this run (train.steps={cfg.steps}, {n_tasks} task(s), "
            f"train.batch_size={cfg.batch_size})",
            hint="give --overwrite to start again, or the config this run was made with",
        )
    return step, list(counts)
