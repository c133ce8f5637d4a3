"""Local differential privacy on the Flower app: Flower's ``LocalDpMod``, switched on per node by
``--node-config "local-dp='clipping_norm=...,sensitivity=...,epsilon=...,delta=...'"``. In one
process, no Flower processes: the parameters, the mod on messages built as the app builds them,
the refusal of a method it does not fit, and one fedalora run through the stand-in Grid of
tests/test_flower_protocol.py where the server must average the clients' noised uploads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import write_choice_tasks

pytest.importorskip("flwr")

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp.mod import LocalDpMod  # noqa: E402
from flwr.common.config import parse_config_args  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.engines import flower as app  # noqa: E402
from asymlora.engines.flower.server_app import local_dp_line  # noqa: E402
from test_flower_protocol import Grid, run_config, task_identity  # noqa: E402, F401

SETTING = "clipping_norm=1.0,sensitivity=1.0,epsilon=2.0,delta=1e-5"


def norm(tensors) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tensors.values()))


def sub(a, b):
    return {k: a[k] - b[k] for k in a}


def clipped(delta, bound: float):
    """FlatClip, as Flower's mod clips: the whole update scaled to norm <= bound."""
    return {k: v * min(1.0, bound / norm(delta)) for k, v in delta.items()}


# --- (a) the switch -----------------------------------------------------------------------------
def test_the_node_config_key_sets_the_mod_and_its_parameters() -> None:
    # what `flower-supernode --node-config "..."` hands the ClientApp's context
    node_config = parse_config_args([f"partition-id=2 local-dp='{SETTING}'"])
    assert node_config == {"partition-id": 2, "local-dp": SETTING}
    mod = app.local_dp_mod(node_config)
    assert isinstance(mod, LocalDpMod)
    assert (mod.clipping_norm, mod.sensitivity, mod.epsilon, mod.delta) == (1.0, 1.0, 2.0, 1e-5)
    assert app.noise_std(mod) == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 2)
    assert app.local_dp_mod({"partition-id": 0}) is None
    assert app.local_dp_mod({"partition-id": 0, "local-dp": ""}) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("clipping_norm=1.0,sensitivity=1.0,epsilon=2.0", "missing delta"),
        ("clipping_norm=1.0,sensitivity=1.0,epsilon=2.0,delta=1e-5,noise=3", "'noise=3'"),
        ("clipping_norm=one,sensitivity=1.0,epsilon=2.0,delta=1e-5", "clipping_norm='one' is not a number"),
        ("clipping_norm=0,sensitivity=1.0,epsilon=2.0,delta=1e-5", "clipping_norm must be > 0"),
        ("clipping_norm=1,sensitivity=1.0,epsilon=0,delta=1e-5", "epsilon must be > 0"),
        ("clipping_norm=1,sensitivity=0,epsilon=1,delta=1e-5", "sensitivity must be > 0"),
        ("clipping_norm=1,sensitivity=1,epsilon=1,delta=1", "delta must be in (0, 1)"),
        ("clipping_norm=inf,sensitivity=1,epsilon=1,delta=0.1", "must be finite"),
        ("1.0,1.0,2.0,1e-5", "expected clipping_norm=...,sensitivity=...,epsilon=...,delta=..."),
    ],
)
def test_bad_values_are_refused_naming_the_key(value: str, says: str) -> None:
    with pytest.raises(ValueError, match="node config local-dp=") as err:
        app.local_dp_mod({"partition-id": 0, "local-dp": value})
    assert says in str(err.value)


# --- (b) the mod on the app's messages ------------------------------------------------------------
def train_message(download: dict) -> Message:
    msg = app.message(100, MessageType.TRAIN, 2, (app.DOWNLOAD, download, 1))
    msg.metadata.__dict__["_message_id"] = "ab" * 32  # as delivered
    msg.metadata.__dict__["_src_node_id"] = 1
    return msg


def upload_reply(msg: Message, upload: dict) -> Message:
    content = {app.UPLOAD: app.to_record(upload), "metrics": MetricRecord({"loss": 1.0})}
    return Message(RecordDict(content), reply_to=msg)


def fedalora_tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q_proj.lora_B": torch.randn(64, 4, generator=g) for i in range(3)}


def test_flowers_mod_clips_the_update_from_the_download_and_adds_its_noise() -> None:
    """Flower's LocalDpMod on a fedalora download, in the message ``app.privacy`` hands it (one
    ArrayRecord of Flower's arrays: the train message carries its tensors packed, which Flower's
    mods cannot read), and a reply carrying the upload: upload' = download + clip(upload -
    download) + noise, keys unchanged."""
    download = fedalora_tensors(0)
    step = fedalora_tensors(1)  # the update, norm about 27
    upload = {k: download[k] + step[k] for k in download}
    mod = LocalDpMod(clipping_norm=1.0, sensitivity=1.0, epsilon=2.0, delta=1e-5)
    msg = Message(RecordDict({"reference": app.to_record(download)}), reply_to=train_message(download))
    np.random.seed(7)
    out = mod(msg, Context(1, 100, {}, RecordDict(), {}), lambda m, c: upload_reply(m, upload))
    assert not out.has_error()
    got = app.from_record(out.content[app.UPLOAD])
    assert list(got) == list(upload)
    assert all(got[k].dtype == torch.float32 for k in got)
    np.random.seed(7)  # the same draws, in the mod's order
    std = app.noise_std(mod)
    noise = {
        k: torch.from_numpy(np.random.normal(0, std, v.shape).astype(np.float32)) for k, v in upload.items()
    }
    update = sub(sub(got, download), noise)  # what the mod kept of the update
    assert norm(step) > 10
    assert norm(update) <= 1.0 + 1e-4
    for k in update:  # the update scaled down, not changed otherwise
        torch.testing.assert_close(update[k], clipped(step, 1.0)[k], atol=1e-5, rtol=0)


def dp_context(method: str, tmp_path: Path, setting: str = SETTING) -> Context:
    tasks = [str(tmp_path / f"t{i}.jsonl") for i in range(3)]  # never read here
    return Context(
        1, 100, {"partition-id": 0, "local-dp": setting}, RecordDict(), run_config(method, tasks, tmp_path)
    )


def test_the_apps_mod_measures_from_the_kept_reference_and_draws_fresh_noise(tmp_path: Path) -> None:
    """``app.privacy`` (the train handler's mod): the reference the handler kept, fresh noise
    for every upload even where numpy's generator starts from the same state (forked tasks)."""
    reference, step = fedalora_tensors(0), fedalora_tensors(1)
    upload = {k: reference[k] + step[k] for k in reversed(list(reference))}  # another key order
    context = dp_context("fedalora", tmp_path, "clipping_norm=0.5,sensitivity=0.1,epsilon=1,delta=1e-5")
    std = 0.1 * math.sqrt(2 * math.log(1.25e5))

    def handler(msg: Message, ctx: Context) -> Message:
        ctx.state[app.REFERENCE] = app.to_record(reference)
        return upload_reply(msg, upload)

    noises = []
    for _ in range(2):
        np.random.seed(0)
        out = app.privacy(train_message(reference), context, handler)
        assert not out.has_error()
        assert app.REFERENCE not in context.state  # not kept across rounds
        got = app.from_record(out.content[app.UPLOAD])
        assert sorted(got) == sorted(upload)
        noise = sub(sub(got, reference), clipped(step, 0.5))
        values = torch.cat([v.flatten() for v in noise.values()])
        assert float(values.std()) == pytest.approx(std, rel=0.15)
        assert abs(float(values.mean())) < 4 * std / math.sqrt(values.numel())
        noises.append(values)
    assert not torch.equal(noises[0], noises[1])


# --- (c) a method it does not fit -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedalora-het", "flora", "flexlora", "zeropad"])
def test_a_method_it_does_not_fit_gets_an_error_reply_before_training(tmp_path: Path, method: str) -> None:
    context = dp_context(method, tmp_path)

    def handler(msg: Message, ctx: Context) -> Message:
        raise AssertionError("trained although local DP cannot apply")

    out = app.privacy(train_message(fedalora_tensors(0)), context, handler)
    assert out.has_error()
    assert out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert f"local DP (local-dp in the node config) does not fit method {method}" in out.error.reason
    with pytest.raises(ValueError, match=f"does not fit method {method}"):  # the init fails too
        app.Node.from_context(context)


def test_bad_values_give_an_error_reply(tmp_path: Path) -> None:
    context = dp_context("fedalora", tmp_path, "clipping_norm=1,epsilon=1,delta=1e-5")
    out = app.privacy(train_message(fedalora_tensors(0)), context, lambda m, c: upload_reply(m, {}))
    assert (
        out.has_error()
        and "node config local-dp=" in out.error.reason
        and "missing sensitivity" in out.error.reason
    )


# --- (d) a run: the server averages the noised uploads ----------------------------------------------
class RecordingGrid(Grid):
    """The stand-in Grid, every node with ``local-dp``; keeps what was sent and answered."""

    def __init__(self, config: dict, nodes: int, setting: str) -> None:
        super().__init__(config, nodes, {})
        for context in self.contexts.values():
            context.node_config["local-dp"] = setting
        self.examples: dict[int, int] = {}
        # round -> node -> the setup / download that round's message carried (rounds + 1: the finish)
        self.received: dict[int, dict[int, dict]] = {}
        self.uploads: dict[int, dict[int, dict]] = {}  # round -> node -> noised upload
        self.trained: dict[int, dict[int, dict]] = {}  # round -> node -> its clean trained state

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        for msg in messages:
            content, node = msg.content, msg.metadata.dst_node_id
            rnd = int(content["config"]["round"])
            key = rnd if msg.metadata.message_type == MessageType.TRAIN else rnd + 1  # the finish
            for name in (app.SETUP, app.DOWNLOAD):
                if name in content:
                    self.received.setdefault(key, {})[node] = app.from_record(content[name])
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            if "meta" in reply.content:
                self.examples[node] = int(reply.content["meta"]["examples"])
                assert float(reply.content["meta"]["dp-clip"]) == 0.5
            if app.UPLOAD in reply.content:
                rnd = int(messages[0].content["config"]["round"])
                self.uploads.setdefault(rnd, {})[node] = app.from_record(reply.content[app.UPLOAD])
                state = self.contexts[node].state
                self.trained.setdefault(rnd, {})[node] = app.from_record(state[app.TRAINED])
        return replies


def test_a_fedalora_run_under_local_dp_averages_the_noised_uploads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """3 nodes, 2 rounds; node 2's round-1 upload is NaN (rejected), so its round-2 message
    carries no download (Flower's mod alone would refuse it): the reference is then its state's
    B, unchanged since setup. Every accepted upload is reference + clipped update + noise, and
    each download is the mean of the round's accepted noised uploads."""
    tasks = write_choice_tasks(tmp_path / "tasks", 3, 6)
    config = run_config("fedalora", tasks, tmp_path / "out") | {
        "federation.rounds": 2,
        "test-poison": "2:nan",
    }
    config |= {"federation.max_upload_norm": 1000.0, "federation.min_clients": 2}
    setting = "clipping_norm=0.5,sensitivity=0.01,epsilon=1.0,delta=1e-5"
    std = 0.01 * math.sqrt(2 * math.log(1.25e5))
    grid = RecordingGrid(config, 3, setting)
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))

    method = app.federated_config(config).federation.make_method()
    nodes = sorted(grid.contexts)
    accepted = {1: nodes[:2], 2: nodes}
    assert 102 not in grid.received[2]  # nothing to download after its rejected round
    for rnd in (1, 2):
        assert sorted(grid.uploads[rnd]) == nodes
        kept = accepted[rnd]
        total = sum(grid.examples[n] for n in kept)
        mean = {
            k: sum(grid.examples[n] * grid.uploads[rnd][n][k].double() for n in kept) / total
            for k in grid.uploads[rnd][nodes[0]]
        }
        # the download of round `rnd` (sent with round rnd + 1, or with the finish) is that mean
        for n in kept:
            download = grid.received[rnd + 1][n]
            assert sorted(download) == sorted(mean)
            for k, v in mean.items():
                torch.testing.assert_close(download[k].double(), v, atol=1e-6, rtol=0)
        for n in kept:
            # upload' = the node's B before training (setup's B in round 1, the download after)
            # + the clipped update of its clean training + noise of the configured std
            reference = grid.received[rnd].get(n, grid.received[1][n])
            clean = method.upload(grid.trained[rnd][n])
            noise = sub(sub(grid.uploads[rnd][n], reference), clipped(sub(clean, reference), 0.5))
            values = torch.cat([v.flatten() for v in noise.values()])
            assert float(values.std()) == pytest.approx(std, rel=0.15)
            assert norm(grid.uploads[rnd][n]) <= norm(reference) + 0.5 + 1.2 * std * math.sqrt(values.numel())
    server = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    assert sorted(server) == sorted(grid.received[3][nodes[0]])
    for k, v in grid.received[3][nodes[0]].items():
        torch.testing.assert_close(server[k], v, atol=0, rtol=0)
    said = local_dp_line({"dp-clip": 0.5, "dp-std": std, "dp-delta": 1e-5})  # each node states its ε
    assert caplog.text.count(f"uploads under local DP: {said}") == 3
    lines = (tmp_path / "out" / app.ROUNDS_FILE).read_text().splitlines()
    assert (
        '"rejected": {"task2": "' in lines[0] and '"rejected": {}' in lines[1] and '"dropped": {}' in lines[1]
    )


def test_a_bad_setting_on_one_node_stops_the_run_at_the_init_naming_it(tmp_path: Path) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", 3, 6)
    config = run_config("fedalora", tasks, tmp_path / "out") | {"federation.rounds": 1}
    grid = RecordingGrid(config, 3, "clipping_norm=0.5,sensitivity=0.01,epsilon=1.0,delta=1e-5")
    grid.contexts[101].node_config["local-dp"] = "clipping_norm=0.5,epsilon=1.0,delta=1e-5"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RuntimeError, match=r"no SuperNode answered as client\(s\) \[1\]") as err:
        app.server_main(grid, context)
    assert "node config local-dp=" in str(err.value) and "missing sensitivity" in str(err.value)
    assert [kind for _, kind, _ in grid.sent] == ["query.init"] * 3


def test_each_upload_under_local_dp_states_its_epsilon() -> None:
    """docs/flower.md's example, clipping_norm=1, sensitivity=2, epsilon=0.5, delta=1e-5: Flower's
    mod adds noise of std 19.38, the Gaussian mechanism of noise multiplier 19.38 / (2 x 1) (the
    clipped update moves by at most 2 x the clip). Its ε by the RDP accountant (0.388) lies between
    the exact ε of that mechanism (0.353, Balle & Wang 2018, Theorem 8) and the 0.5 of the classic
    calibration the mod applies."""
    from test_flower_central_dp import gaussian_dp_epsilon

    std = 2 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    line = local_dp_line({"dp-clip": 1.0, "dp-std": std, "dp-delta": 1e-5})
    epsilon = float(line.split("(ε, δ) = (")[1].split(",")[0])
    assert gaussian_dp_epsilon(std / 2, 1e-5) < epsilon < 0.5
    assert epsilon == pytest.approx(0.3883, abs=1e-4) and "1e-05) per round it uploads in" in line
