"""How a trained adapter's learned routers use their experts on a set of prompts: per adapted
module, each expert's usage (its mean gate weight over the prompts' tokens) and the gates' mean
entropy (adapters/gates.py), and whether the router has collapsed.

The collapse rule (docs/router.md): a module has collapsed when one expert takes more than
``COLLAPSE_SHARE`` (90 %) of its mean gate weight; the router has collapsed when more than
``COLLAPSE_MODULES`` (half) of the modules have. A collapsed router trains one expert in place of
K: ALoRA then is one LoRA with K - 1 idle A's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..adapters.gates import GateStats
from ..eval.runner import eval_mode
from ..eval.scoring import prompt_tokens
from ..train.batches import IGNORE, Encoded, collate
from ..train.loop import pad_id_of

COLLAPSE_SHARE = 0.9
COLLAPSE_MODULES = 0.5


def gate_usage(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_length: int = 1024
) -> GateStats:
    """The learned routers' gates over every token of ``prompts`` (each tokenized as the evaluator
    reads it, its last ``max_length`` tokens), ``batch_size`` prompts per forward pass."""
    stats = model.gate_stats()
    encoded = [prompt_tokens(tokenizer, p)[-max_length:] for p in prompts]
    device, pad = stats.totals.device, pad_id_of(tokenizer)
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            rows = [Encoded(ids, [IGNORE] * len(ids), 0) for ids in encoded[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows, pad).items() if k != "labels"}
            with model.recording_gates(batch["attention_mask"]) as seen:
                model(**batch)
            stats.add(seen)
    return stats


def top_share(usage: Sequence[float]) -> float:
    """The largest expert's share of a module's mean gate weight."""
    return max(usage) / sum(usage)


def collapsed_modules(modules: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The modules (of a ``GateStats.summary``) where one expert takes more than ``COLLAPSE_SHARE``."""
    return [name for name, seen in modules.items() if top_share(seen["usage"]) > COLLAPSE_SHARE]


def is_collapsed(modules: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether more than ``COLLAPSE_MODULES`` of the modules have collapsed."""
    return len(collapsed_modules(modules)) > COLLAPSE_MODULES * len(modules)


def router_report(
    model, tokenizer, prompts: Mapping[str, Sequence[str]], *, batch_size: int = 8, max_length: int = 1024
) -> dict[str, Any]:
    """Usage, entropy and the collapse verdict of ``model``'s routers on each named set of prompts
    (``{"train": [...], "test": [...]}``), as JSON."""
    config = model.adapter_config
    report: dict[str, Any] = {
        "method": config.method,
        "router": config.router,
        "num_experts": config.num_experts,
        "max_entropy": math.log(config.num_experts),
        "rule": {"collapse_share": COLLAPSE_SHARE, "collapse_modules": COLLAPSE_MODULES},
        "splits": {},
    }
    for split, texts in prompts.items():
        stats = gate_usage(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
        modules = stats.summary()
        report["splits"][split] = {
            "prompts": len(texts),
            "tokens": stats.tokens,
            "collapsed": is_collapsed(modules),
            "collapsed_modules": collapsed_modules(modules),
            "modules": modules,
        }
    return report


def format_router_report(report: Mapping[str, Any]) -> list[str]:
    """The report as lines: a row per module and split, then one plain verdict per split."""
    k = report["num_experts"]
    head = f"{'module':<44} {'split':<6} {'usage (expert ' + ' '.join(map(str, range(k))) + ')':<{7 * k + 8}} entropy  top"
    lines = [head]
    splits = report["splits"]
    modules = next(iter(splits.values()))["modules"] if splits else {}
    for name in modules:
        for split, seen in splits.items():
            row = seen["modules"][name]
            usage = " ".join(f"{u:6.3f}" for u in row["usage"])
            lines.append(
                f"{name:<44} {split:<6} {usage:<{7 * k + 8}} {row['entropy']:7.3f}  {top_share(row['usage']):4.2f}"
            )
    lines.append(
        f"(entropy in nats: {report['max_entropy']:.3f} = log {k} when every token mixes the experts equally)"
    )
    for split, seen in splits.items():
        n, collapsed = len(seen["modules"]), len(seen["collapsed_modules"])
        verdict = "COLLAPSED" if seen["collapsed"] else "not collapsed"
        lines.append(
            f"{split} ({seen['prompts']} prompts, {seen['tokens']} tokens): {verdict}: in {collapsed} of {n} "
            f"modules one expert takes more than {COLLAPSE_SHARE:.0%} of the mean gate weight "
            f"(collapsed: more than {COLLAPSE_MODULES:.0%} of the modules)"
        )
    return lines
