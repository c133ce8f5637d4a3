"""Central DP on the Flower engine: Flower's own fixed-clipping strategy wrappers around
asymlora's strategy, run in one process through the stand-in Grid (the real ServerApp and
ClientApp code, no Flower processes; tests/test_flower.py runs them over real processes).

Server-side clipping: each accepted upload U_i is clipped to R + clip(U_i - R, C), with R the
round's global arrays, and the plain mean of the clipped uploads gets Gaussian noise of std
z C / n. Client-side clipping: each node sends R_i + clip(U_i - R_i, C), with R_i what it held
before training; the server adds the same noise to the plain mean.
"""

from __future__ import annotations

import json
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
from asymlora.engines.flower.accounting import (  # noqa: E402
    CentralPrivacy,
    gaussian_epsilon,
    local_multiplier,
)
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


# --- the (ε, δ) a run reports ---------------------------------------------------------------------
PUBLISHED_SIGMA = 4.530877117  # (1, 1e-6)-DP by RDP: see the first test below


def gaussian_dp_epsilon(sigma: float, delta: float) -> float:
    """The exact ε of the Gaussian mechanism of noise multiplier ``sigma`` at ``delta``: the root of
    Balle & Wang's condition (ICML 2018, "Improving the Gaussian mechanism for differential privacy",
    Theorem 8): Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) = delta."""
    from scipy.optimize import brentq
    from scipy.stats import norm as gauss

    def excess(eps: float) -> float:
        a, b = 1 / (2 * sigma), eps * sigma
        return gauss.cdf(a - b) - math.exp(eps) * gauss.cdf(-a - b) - delta

    return brentq(excess, 1e-9, 50)


@pytest.mark.parametrize("rounds", [1, 4])
def test_every_client_each_round_gives_the_gaussian_mechanisms_published_epsilon(rounds: int) -> None:
    """fraction 1.0 (q = 1): each round is the Gaussian mechanism, noise multiplier z / 2 against
    the replace-one sensitivity 2 C. dp-accounting's own test (dp_accounting/rdp/
    rdp_privacy_accountant_test.py, test_compute_epsilon_delta_gaussian) publishes noise
    multiplier 4.530877117 as (1, 1e-6)-DP by RDP; R rounds of multiplier s compose to one of
    s / sqrt(R), so z = 2 x 4.530877117 x sqrt(R) must give ε = 1 after R rounds. And RDP's ε is
    an upper bound: at least the exact ε of Balle & Wang (about 0.93 here), not far above it."""
    sigma = PUBLISHED_SIGMA
    privacy = CentralPrivacy(2 * sigma * math.sqrt(rounds), clients=5, sampled=5, delta=1e-6)
    lines = [privacy.spend(aggregated=5) for _ in range(rounds)]
    assert lines[-1]["epsilon"] == pytest.approx(1.0, abs=1e-6) and lines[-1]["delta"] == 1e-6
    assert gaussian_dp_epsilon(sigma, 1e-6) < lines[-1]["epsilon"] < 1.1 * gaussian_dp_epsilon(sigma, 1e-6)
    assert [x["epsilon"] for x in lines] == sorted({x["epsilon"] for x in lines})  # increasing
    assert "(ε, δ) = (1, 1e-06) for the run" in privacy.summary()


def test_sampling_fewer_clients_gives_a_smaller_epsilon_and_no_noise_none() -> None:
    z, delta = 1.0, 1e-5
    full = CentralPrivacy(z, clients=10, sampled=10, delta=delta).spend(10)["epsilon"]
    sampled = CentralPrivacy(z, clients=10, sampled=3, delta=delta).spend(3)["epsilon"]
    assert 0 < sampled < full < math.inf
    assert CentralPrivacy(0.0, clients=10, sampled=3, delta=delta).spend(3)["epsilon"] == math.inf
    # a local-DP upload: the Gaussian mechanism, noise std / (2 x clip), q = 1
    assert gaussian_epsilon(local_multiplier(2 * PUBLISHED_SIGMA, 1.0), 1e-6) == pytest.approx(1.0, abs=1e-6)


def test_a_run_reports_epsilon_per_round_for_its_sampling_and_its_accepted_uploads(tmp_path: Path) -> None:
    """4 nodes, 3 per round (q = 3/4); node 3, sampled in round 2, uploads NaN (rejected: that
    round's mean holds 2 uploads under noise calibrated for 3). rounds.jsonl's ε after each round
    is dp-accounting's, computed here straight from its events: sampling without replacement, one
    client replaced, noise multiplier z k / (2 m)."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    z, delta, n, m = 1.5, 1e-4, 4, 3
    tasks = write_choice_tasks(tmp_path / "tasks", n, 6)
    config = run_config("fedit", tasks, tmp_path / "out") | {
        "federation.rounds": 3,
        "federation.fraction": 0.75,
        "federation.central_dp": "server",
        "federation.dp_noise_multiplier": z,
        "federation.dp_delta": delta,
        "test-poison": "3:nan,nan,nan",
    }
    grid = Grid(config, n, {})
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    lines = [json.loads(x) for x in (tmp_path / "out" / app.ROUNDS_FILE).read_text().splitlines()]
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    aggregated = []
    for line in lines:
        k = len(line["participants"])
        aggregated.append(k)
        gaussian = dp_event.GaussianDpEvent(z * k / (2 * m))
        accountant.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, gaussian))
        assert line["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert line["delta"] == delta
    assert 2 in aggregated and 3 in aggregated, aggregated  # both kinds of round were run
    assert [x["epsilon"] for x in lines] == sorted({x["epsilon"] for x in lines})  # increasing
    for bad in (0.0, 1.0, math.nan, math.inf):
        with pytest.raises(
            ConfigError, match=r"federation.dp_delta(=.* must be a number in \(0, 1\)|: nan|: inf)"
        ):
            app.federated_config(config | {"federation.dp_delta": bad})
