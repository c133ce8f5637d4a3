"""Central DP on the Flower engine: Flower's own fixed-clipping strategy wrappers around
asymlora's strategy, run in one process through the stand-in Grid (the real ServerApp and
ClientApp code, no Flower processes; tests/test_flower.py runs them over real processes).

Server-side clipping: each accepted upload U_i is clipped to R + clip(U_i - R, C), with R the
round's global arrays, and the plain mean of the clipped uploads gets Gaussian noise of std
z C / n. Client-side clipping: each node sends R_i + clip(U_i - R_i, C), with R_i what it held
before training; the server adds the same noise to the plain mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tiny_models import write_choice_tasks

pytest.importorskip("flwr")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.config import ConfigError  # noqa: E402
from asymlora.engines import flower as app  # noqa: E402
from test_flower_local_dp import clipped, norm, sub  # noqa: E402
from test_flower_protocol import Grid, run_config, task_identity  # noqa: E402, F401

NODES, CLIP = 3, 0.05


class RecordingGrid(Grid):
    """The stand-in Grid, keeping per round what each node was sent (its setup or download)
    and what it answered (its upload, as it left the node)."""

    def __init__(self, config: dict, nodes: int) -> None:
        super().__init__(config, nodes, {})
        self.received: dict[int, dict[int, dict]] = {}  # round (rounds + 1: the finish) -> node -> tensors
        self.uploads: dict[int, dict[int, dict]] = {}  # round -> node -> upload

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            rnd = int(msg.content["config"]["round"])
            key = rnd if msg.metadata.message_type == MessageType.TRAIN else rnd + 1
            for name in (app.SETUP, app.DOWNLOAD):
                if name in msg.content:
                    self.received.setdefault(key, {})[msg.metadata.dst_node_id] = app.from_record(
                        msg.content[name]
                    )
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if not reply.has_error() and app.UPLOAD in reply.content:
                rnd = int(messages[0].content["config"]["round"])
                self.uploads.setdefault(rnd, {})[reply.metadata.src_node_id] = app.from_record(
                    reply.content[app.UPLOAD]
                )
        return replies


def run(tmp_path: Path, where: str, noise: float, model: str = "tiny-llama") -> RecordingGrid:
    tasks = write_choice_tasks(tmp_path / "tasks", NODES, 6)
    config = run_config("fedalora", tasks, tmp_path / "out") | {
        "model": model,
        "federation.rounds": 2,
        "federation.central_dp": where,
        "federation.dp_clipping_norm": CLIP,
        "federation.dp_noise_multiplier": noise,
        "train.lr": 5e-2,  # updates well beyond CLIP, so that clipping acts
    }
    grid = RecordingGrid(config, NODES)
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return grid


def reference(grid: RecordingGrid, rnd: int, node: int) -> dict:
    """What the node held of the uploaded parts before training in round ``rnd``."""
    return grid.received[rnd].get(node, grid.received[1][node])


def mean(uploads: list[dict]) -> dict:
    return {k: sum(u[k].double() for u in uploads) / len(uploads) for k in uploads[0]}


def deep_model(folder: Path) -> str:
    """A saved tiny llama of 12 layers: its modules' order (layers.2 before layers.10) is not
    the sorted order of their names (layers.10 before layers.2)."""
    from transformers import LlamaForCausalLM

    from asymlora.models import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config("tiny-llama", len(tokenizer))
    config.num_hidden_layers = 12
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("deep", [False, True])
def test_server_side_clipping_clips_each_update_and_noises_the_mean(tmp_path: Path, deep: bool) -> None:
    """Also with 12 layers: the wrapper pairs each upload's arrays with the global arrays by
    position, so both must come in one order."""
    z = 2.0
    model = deep_model(tmp_path / "deep") if deep else "tiny-llama"
    grid = run(tmp_path, "server", z, model)
    nodes = sorted(grid.contexts)
    for rnd in (1, 2):
        sent = [grid.uploads[rnd][n] for n in nodes]
        ref = reference(grid, rnd, nodes[0])  # the global arrays: every node got the same
        assert all(norm(sub(u, ref)) > 2 * CLIP for u in sent), "clipping must act"
        clean = mean([{k: ref[k] + d[k] for k in ref} for d in (clipped(sub(u, ref), CLIP) for u in sent)])
        download = grid.received[rnd + 1][nodes[0]]
        noise = torch.cat([(download[k].double() - clean[k]).flatten() for k in clean])
        std = z * CLIP / NODES
        assert float(noise.std()) == pytest.approx(std, rel=0.15)
        assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())
        assert all(torch.equal(grid.received[rnd + 1][n][k], download[k]) for n in nodes for k in download)
    server = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    assert all(torch.equal(server[k], grid.received[3][nodes[0]][k]) for k in server)


def test_client_side_clipping_sends_clipped_updates_and_the_server_means_them(tmp_path: Path) -> None:
    grid = run(tmp_path, "client", 0.0)
    nodes = sorted(grid.contexts)
    for rnd in (1, 2):
        sent = [grid.uploads[rnd][n] for n in nodes]
        for n, upload in zip(nodes, sent, strict=True):
            assert norm(sub(upload, reference(grid, rnd, n))) <= CLIP * (1 + 1e-4)
        download = grid.received[rnd + 1][nodes[0]]
        for k, v in mean(sent).items():  # no noise at z = 0: the plain mean
            torch.testing.assert_close(download[k].double(), v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["flora", "fedalora-het"])
def test_central_dp_is_refused_naming_the_methods_reason(tmp_path: Path, method: str) -> None:
    config = run_config(method, ["a.jsonl", "b.jsonl"], tmp_path) | {"federation.central_dp": "server"}
    with pytest.raises(ConfigError) as err:
        app.federated_config(config)
    reason = {"flora": "stacks the uploads", "fedalora-het": "accumulates the products"}[method]
    assert f"does not fit {method}: its server" in str(err.value) and reason in str(err.value)
