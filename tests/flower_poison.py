"""A test-only Flower ClientApp: asymlora's, with a mod that makes chosen nodes corrupt their
upload, to play bad clients against the real ServerApp.

The run-config key ``test-poison`` is ``"<partition-id>:<kind>,<kind>;..."``: that node's upload
in rounds 1, 2, ... is corrupted as ``kind`` says (``nan``, ``inf``, ``extra-name``, ``shape``,
``huge``, ``dtype``, ``raise``, ``-`` for an honest round). In process the tests call
``client_app``; over real Flower processes ``app_folder`` writes a Flower app (this module and a
pyproject.toml declaring it, with the key) that ``scripts/flower_local.sh`` runs (FLOWER_APP).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MessageType
from torch import Tensor

from asymlora.engines.flower import UPLOAD, client_app_with, from_record, to_record

POISON_KEY = "test-poison"
POISONS = ("nan", "inf", "extra-name", "shape", "huge", "dtype", "raise", "-")


def poison_plan(run_config: Mapping[str, Any]) -> dict[int, list[str]]:
    """``test-poison`` parsed: partition-id -> the kind of corruption per round (``-``: none)."""
    plan: dict[int, list[str]] = {}
    for item in str(run_config.get(POISON_KEY, "")).split(";"):
        if not item.strip():
            continue
        index, _, kinds = item.partition(":")
        plan[int(index)] = [k.strip() for k in kinds.split(",")]
        bad = [k for k in plan[int(index)] if k not in POISONS]
        if bad:
            raise ValueError(f"{POISON_KEY}: unknown kind(s) {bad}; expected {', '.join(POISONS)}")
    return plan


def poisoned(upload: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """``upload`` corrupted as ``kind`` says."""
    out = {k: v.clone() for k, v in upload.items()}
    first = sorted(out)[0]
    if kind in ("nan", "inf"):
        out[first].view(-1)[0] = float(kind)
    elif kind == "extra-name":
        out[first.rpartition(".")[0] + ".lora_extra"] = torch.zeros(2, 2)
    elif kind == "shape":
        out[first] = torch.zeros(out[first].shape[0] + 1, *out[first].shape[1:])
    elif kind == "huge":
        out = {k: v * 1e6 for k, v in out.items()}
    elif kind == "dtype":
        out[first] = out[first].double()
    return out


def poison(msg: Message, context: Context, call_next) -> Message:
    """The mod: a train reply of a node the plan names, corrupted for this round."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    index, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
    kinds = poison_plan(context.run_config).get(index, [])
    kind = kinds[rnd - 1] if 0 < rnd <= len(kinds) and kinds[rnd - 1] != "-" else ""
    if kind == "raise":
        raise RuntimeError(f"{POISON_KEY}: client {index} raises in round {rnd}")
    reply = call_next(msg, context)
    if kind and not reply.has_error():
        reply.content[UPLOAD] = to_record(poisoned(from_record(reply.content[UPLOAD]), kind))
    return reply


client_app = client_app_with(poison)


def app_folder(folder: Path, pyproject: Path) -> Path:
    """A Flower app in ``folder``: asymlora's app declaration (``pyproject``) with this
    module's ClientApp and the ``test-poison`` key."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, folder / "flower_poison.py")
    text = pyproject.read_text()
    text = text.replace(
        'clientapp = "asymlora.engines.flower:client_app"', 'clientapp = "flower_poison:client_app"'
    )
    text = text.replace(
        'fab-include = ["src/asymlora/**/*.py"]', 'fab-include = ["src/asymlora/**/*.py", "flower_poison.py"]'
    )
    text = text.replace("[tool.flwr.app.config]\n", f'[tool.flwr.app.config]\n{POISON_KEY} = ""\n')
    (folder / "pyproject.toml").write_text(text)
    return folder
