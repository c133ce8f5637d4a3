"""Every federated method against a slow, written-out formula (explicit loops over clients).

The expected values are computed here with plain loops and sums, not with the library's
helpers, so a shared helper cannot make a method and its check wrong the same way.
"""

from __future__ import annotations

import pytest
import torch

from asymlora.federated import METHODS, get_method

MODS = {"layers.0.q_proj": (6, 5), "layers.1.v_proj": (6, 4)}  # module -> (d_in, d_out)
N_EX = [10, 30, 60]  # example counts of three clients
ATOL = 1e-5


def probs(n: list[float]) -> list[float]:
    total = sum(n)
    return [x / total for x in n]


def lora_states(ranks: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        s = {}
        for mod, (d_in, d_out) in MODS.items():
            s[f"{mod}.lora_A"] = torch.randn(r, d_in, generator=g)
            s[f"{mod}.lora_B"] = torch.randn(d_out, r, generator=g)
        states.append(s)
    return states


def het_states(ranks: list[int], d_m: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    states = []
    base = {mod: torch.randn(d_out, d_m, generator=g) for mod, (_, d_out) in MODS.items()}
    for r in ranks:
        s = {}
        for mod, (d_in, d_out) in MODS.items():
            s[f"{mod}.lora_A"] = torch.randn(r, d_in, generator=g)
            s[f"{mod}.lora_M"] = torch.randn(d_m, r, generator=g)
            s[f"{mod}.lora_B1"] = torch.randn(r, d_m, generator=g)
            s[f"{mod}.lora_B2"] = torch.zeros(d_out, r)
            s[f"{mod}.lora_B_base"] = base[mod].clone()
        states.append(s)
    return states


def train(method, states, seed: int = 1):
    """Stand-in for local training: add noise to every trainable tensor, leave the rest."""
    g = torch.Generator().manual_seed(seed)
    return [
        {k: v + torch.randn(v.shape, generator=g) if method.trainable(k) else v for k, v in s.items()}
        for s in states
    ]


def run_round(method, states, inits, server, n_ex=N_EX, scales=None):
    uploads = [method.upload(s) for s in states]
    server, downloads = method.aggregate(uploads, n_ex, server, scales)
    new = [method.apply_download(s, d, i) for s, d, i in zip(states, downloads, inits, strict=True)]
    return uploads, server, downloads, new


def start(method, states):
    server, states = method.setup(states)
    return server, states, [dict(s) for s in states]


# --- homogeneous methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sent, kept",
    [
        ("fedit", ["lora_A", "lora_B"], []),
        ("fedsa", ["lora_A"], ["lora_B"]),
        ("fedalora", ["lora_B"], ["lora_A"]),
    ],
)
def test_homogeneous_averages_what_is_sent_and_keeps_the_rest(name, sent, kept):
    method = get_method(name)
    server, states, inits = start(method, lora_states([3, 3, 3]))
    states = train(method, states)
    uploads, server, downloads, new = run_round(method, states, inits, server)
    p = probs(N_EX)
    for mod in MODS:
        for part in sent:
            key = f"{mod}.{part}"
            expected = torch.zeros_like(states[0][key])
            for i in range(3):
                expected += p[i] * states[i][key]
            for i in range(3):
                assert torch.allclose(downloads[i][key], expected, atol=ATOL)
                assert torch.allclose(new[i][key], expected, atol=ATOL)
        for part in kept:
            key = f"{mod}.{part}"
            for i in range(3):
                assert key not in uploads[i]
                assert torch.equal(new[i][key], states[i][key])


def test_ffa_trains_only_b_on_a_common_a_and_is_exact():
    method = get_method("ffa")
    server, states, inits = start(method, lora_states([3, 3, 3]))
    for mod in MODS:
        assert not method.trainable(f"{mod}.lora_A") and method.trainable(f"{mod}.lora_B")
        for i in range(3):  # setup gave every client client 0's A
            assert torch.equal(states[i][f"{mod}.lora_A"], states[0][f"{mod}.lora_A"])
    states = train(method, states)
    uploads, server, downloads, new = run_round(method, states, inits, server)
    p = probs(N_EX)
    for mod in MODS:
        a = states[0][f"{mod}.lora_A"]
        exact = sum(p[i] * states[i][f"{mod}.lora_B"] @ a for i in range(3))
        for i in range(3):
            assert set(uploads[i]) == {f"{m}.lora_B" for m in MODS}
            assert torch.allclose(new[i][f"{mod}.lora_B"] @ new[i][f"{mod}.lora_A"], exact, atol=ATOL)


def test_fedalora_keeps_each_a_across_rounds():
    method = get_method("fedalora")
    server, states, inits = start(method, lora_states([3, 3, 3]))
    for rnd in range(2):
        trained = train(method, states, seed=rnd)
        _, server, _, states = run_round(method, trained, inits, server)
        for i in range(3):
            for mod in MODS:
                key = f"{mod}.lora_A"
                assert torch.equal(states[i][key], trained[i][key])
                assert not torch.equal(states[i][key], inits[i][key])
    # independent inits stay different between clients
    assert not torch.equal(states[0]["layers.0.q_proj.lora_A"], states[1]["layers.0.q_proj.lora_A"])


@pytest.mark.parametrize("a_init", ["common", "independent"])
def test_fedalora_reset_option_puts_every_a_back_to_its_round0_value(a_init):
    """The 2 x 2 of the A ablation's reset column: with a common start (the reference) every
    client's A goes back to client 0's draw each round; with an independent start, to its own."""
    method = get_method("fedalora", reset_a_each_round=True, client_a_init=a_init)
    original = lora_states([3, 3, 3])
    server, states, inits = start(method, original)
    for _ in range(2):
        trained = train(method, states)
        _, server, _, states = run_round(method, trained, inits, server)
        for i in range(3):
            source = original[0] if a_init == "common" else original[i]
            for mod in MODS:
                assert torch.equal(states[i][f"{mod}.lora_A"], source[f"{mod}.lora_A"])
                assert not torch.equal(states[i][f"{mod}.lora_B"], original[i][f"{mod}.lora_B"])


def test_weights_are_example_counts():
    method = get_method("fedalora")
    server, states, inits = start(method, lora_states([2, 2]))
    states = train(method, states)
    uploads = [method.upload(s) for s in states]
    _, d1 = method.aggregate(uploads, [10, 30], server)
    _, d2 = method.aggregate(uploads, [1.0, 3.0], server)
    _, only_second = method.aggregate(uploads, [0, 7], server)
    for key in uploads[0]:
        assert torch.allclose(d1[0][key], 0.25 * uploads[0][key] + 0.75 * uploads[1][key], atol=ATOL)
        assert torch.allclose(d1[0][key], d2[0][key], atol=ATOL)
        assert torch.allclose(only_second[0][key], uploads[1][key], atol=ATOL)
    for bad in ([1], [1, 2, 3], [0, 0], [-1, 2]):
        with pytest.raises(ValueError):
            method.aggregate(uploads, bad, server)


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "fedalora"])
def test_homogeneous_methods_refuse_mixed_ranks(name):
    method = get_method(name)
    states = lora_states([3, 2])
    uploads = [method.upload(s) for s in states]
    with pytest.raises(ValueError, match="same rank"):
        method.aggregate(uploads, [1, 1], {})


# --- heterogeneous methods ------------------------------------------------------------------

RANKS = [4, 2, 3]


def test_zeropad_pads_averages_and_truncates():
    method = get_method("zeropad")
    server, states, inits = start(method, lora_states(RANKS))
    for i, r in enumerate(RANKS):  # setup: everyone starts from the rank-4 client's truncation
        assert torch.equal(states[i]["layers.0.q_proj.lora_A"], states[0]["layers.0.q_proj.lora_A"][:r])
    states = train(method, states)
    uploads, server, downloads, new = run_round(method, states, inits, server)
    p = probs(N_EX)
    for mod, (d_in, d_out) in MODS.items():
        a_glob, b_glob = torch.zeros(4, d_in), torch.zeros(d_out, 4)
        for i, r in enumerate(RANKS):
            for j in range(r):  # rows/columns j >= r_i are the zero padding
                a_glob[j] += p[i] * states[i][f"{mod}.lora_A"][j]
                b_glob[:, j] += p[i] * states[i][f"{mod}.lora_B"][:, j]
        for i, r in enumerate(RANKS):
            assert downloads[i][f"{mod}.lora_A"].shape == (4, d_in)  # sent at the largest rank
            assert torch.allclose(downloads[i][f"{mod}.lora_A"], a_glob, atol=ATOL)
            assert torch.allclose(new[i][f"{mod}.lora_A"], a_glob[:r], atol=ATOL)
            assert torch.allclose(new[i][f"{mod}.lora_B"], b_glob[:, :r], atol=ATOL)
            assert new[i][f"{mod}.lora_A"].shape == (r, d_in)


@pytest.mark.parametrize("dense", [False, True])
def test_flora_merges_the_exact_weighted_sum_and_restarts(dense):
    method = get_method("flora", dense_download=dense)
    original = lora_states(RANKS)
    for s in original:  # a fresh LoRA adapter has B = 0
        s.update({k: torch.zeros_like(v) for k, v in s.items() if k.endswith("lora_B")})
    server, states, inits = start(method, original)
    scales = [16 / r for r in RANKS]  # s_i = alpha / r_i with alpha = 16
    p = probs(N_EX)
    merged = {mod: torch.zeros(d_out, d_in) for mod, (d_in, d_out) in MODS.items()}
    for rnd in range(2):
        trained = train(method, states, seed=rnd + 1)
        _, server, _, states = run_round(method, trained, inits, server, scales=scales)
        for mod in MODS:
            for i in range(3):  # sum_i p_i s_i B_i A_i, written out
                merged[mod] += p[i] * scales[i] * trained[i][f"{mod}.lora_B"] @ trained[i][f"{mod}.lora_A"]
            assert torch.allclose(server[f"{mod}.base_delta"], merged[mod], atol=1e-4)
            for i in range(3):
                assert torch.allclose(states[i][f"{mod}.base_delta"], merged[mod], atol=1e-4)
                assert torch.equal(states[i][f"{mod}.lora_A"], original[i][f"{mod}.lora_A"])
                assert not states[i][f"{mod}.lora_B"].any()


def test_flexlora_sends_the_best_rank_r_approximation():
    method = get_method("flexlora")
    server, states, inits = start(method, lora_states(RANKS))
    scales = [2.0, 0.5, 1.0]
    states = train(method, states)
    _, server, downloads, new = run_round(method, states, inits, server, scales=scales)
    p = probs(N_EX)
    for mod, (d_in, d_out) in MODS.items():
        w = torch.zeros(d_out, d_in, dtype=torch.float64)
        for i in range(3):
            w += p[i] * scales[i] * (states[i][f"{mod}.lora_B"] @ states[i][f"{mod}.lora_A"]).double()
        assert torch.allclose(server[f"{mod}.delta"].double(), w, atol=1e-4)
        u, sv, vh = torch.linalg.svd(w)
        for i, r in enumerate(RANKS):
            a, b = new[i][f"{mod}.lora_A"], new[i][f"{mod}.lora_B"]
            assert a.shape == (r, d_in) and b.shape == (d_out, r)
            product = scales[i] * b.double() @ a.double()
            assert torch.linalg.matrix_rank(product, rtol=1e-5).item() == r  # float32 factors
            best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
            assert torch.allclose(product, best, atol=1e-4)
            # Eckart-Young: the error is exactly the discarded singular values
            err = torch.linalg.norm(w - product)
            assert torch.isclose(err, torch.sqrt((sv[r:] ** 2).sum()), atol=1e-4)
            # the singular values are split evenly between B and A
            assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-4)


def test_fedalora_het_accumulates_b_base_over_two_rounds():
    method = get_method("fedalora-het")
    server, states, inits = start(method, het_states(RANKS))
    p = probs(N_EX)
    expected = {mod: states[0][f"{mod}.lora_B_base"].clone() for mod in MODS}
    for rnd in range(2):
        trained = train(method, states, seed=rnd + 5)
        uploads, server, downloads, states = run_round(method, trained, inits, server)
        for mod, (_, d_out) in MODS.items():
            for i in range(3):
                expected[mod] += p[i] * trained[i][f"{mod}.lora_B2"] @ trained[i][f"{mod}.lora_B1"]
            assert torch.allclose(server[f"{mod}.lora_B_base"], expected[mod], atol=ATOL)
            for i, r in enumerate(RANKS):
                assert set(uploads[i]) == {f"{m}.lora_{x}" for m in MODS for x in ("B1", "B2")}
                assert set(downloads[i]) == {f"{m}.lora_B_base" for m in MODS}
                assert torch.allclose(states[i][f"{mod}.lora_B_base"], expected[mod], atol=ATOL)
                assert torch.equal(states[i][f"{mod}.lora_B2"], torch.zeros(d_out, r))
                for kept in ("lora_A", "lora_M", "lora_B1"):
                    assert torch.equal(states[i][f"{mod}.{kept}"], trained[i][f"{mod}.{kept}"])


def het_delta(state, mod, s):
    """dW = s (B_base + B2 B1) M A, the client's update at ``mod``."""
    shared = state[f"{mod}.lora_B_base"] + state[f"{mod}.lora_B2"] @ state[f"{mod}.lora_B1"]
    return s * shared @ state[f"{mod}.lora_M"] @ state[f"{mod}.lora_A"]


def test_fedalora_het_download_preserves_a_lone_clients_function():
    method = get_method("fedalora-het")
    server, states, inits = start(method, het_states([4]))
    trained = train(method, states)
    _, server, _, after = run_round(method, trained, inits, server, n_ex=[7])
    for mod in MODS:
        assert torch.allclose(het_delta(after[0], mod, 2.0), het_delta(trained[0], mod, 2.0), atol=1e-4)


def test_fedalora_het_reset_option_rebuilds_client_parts():
    method = get_method("fedalora-het", reset_a_each_round=True)
    server, states, inits = start(method, het_states(RANKS))
    trained = train(method, states)
    _, _, _, after = run_round(method, trained, inits, server)
    for i in range(3):
        for mod in MODS:
            for part in ("lora_A", "lora_M", "lora_B1"):
                assert torch.equal(after[i][f"{mod}.{part}"], inits[i][f"{mod}.{part}"])


# --- every method in the registry -----------------------------------------------------------


def registry_states(method):
    ranks = RANKS if method.heterogeneous else [3, 3, 3]
    return het_states(ranks) if method.name == "fedalora-het" else lora_states(ranks)


@pytest.mark.parametrize("name", list(METHODS))
def test_nothing_local_is_ever_uploaded(name):
    method = get_method(name)
    assert method.name == name
    assert not method.local & method.uploads
    server, states, inits = start(method, registry_states(method))
    for rnd in range(2):
        states = train(method, states, seed=rnd)
        uploads, server, downloads, states = run_round(method, states, inits, server)
        for up in uploads:
            assert up, "a method must upload something"
            for key in up:
                part = key.rsplit(".", 1)[1]
                assert part not in method.local, f"{name} uploaded local tensor {key}"
                assert part in method.uploads
        assert len(downloads) == len(uploads)


@pytest.mark.parametrize("name", list(METHODS))
def test_upload_shapes_follow_the_declared_state_shapes(name):
    method = get_method(name)
    states = registry_states(method)
    for s, r in zip(states, RANKS if method.heterogeneous else [3, 3, 3], strict=True):
        for mod, (d_in, d_out) in MODS.items():
            for part, shape in method.state_shapes(d_in, d_out, r, 3).items():
                assert tuple(s[f"{mod}.{part}"].shape) == shape


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown federated method"):
        get_method("fedprox")


@pytest.mark.parametrize("name", list(METHODS))
def test_clients_never_share_storage_with_the_download_or_each_other(name):
    """The rule of base.py: a client's state after ``apply_download`` holds its own copies, so
    an in-place change of one client (an optimiser step) cannot reach another or the server."""
    method = get_method(name)
    server, states, inits = start(method, registry_states(method))
    states = train(method, states)
    uploads, server, downloads, new = run_round(method, states, inits, server)
    for state, down in zip(new, downloads, strict=True):
        for key, value in down.items():
            if key in state:
                assert state[key].data_ptr() != value.data_ptr(), f"{name}: {key} shares the download"
    for key in new[0]:
        assert new[0][key].data_ptr() != new[1][key].data_ptr(), f"{name}: clients share {key}"


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_declares_what_engines_need(name):
    """Every registered method answers the engines' questions itself, consistently: an
    averaging method sends back the average of its uploads, and one that is not says why."""
    method = get_method(name)
    assert method.adapter_kind in ("lora", "factored")
    assert method.global_model in ("adapter", "dense", "base", None)
    server, states, inits = start(method, registry_states(method))
    uploads, server, downloads, _ = run_round(method, train(method, states), inits, server)
    if method.not_an_average is None:
        p = probs(N_EX)
        for key in uploads[0]:
            want = sum(w * up[key] for w, up in zip(p, uploads, strict=True))
            for down in downloads:
                torch.testing.assert_close(down[key], want, atol=ATOL, rtol=0)
    else:
        assert len(method.not_an_average) > 20


def with_every_switch(name):
    """The method ``name`` as it is, and with each of its on/off options switched on."""
    from dataclasses import fields

    switches = [f.name for f in fields(METHODS[name]) if f.type in (bool, "bool")]
    return [get_method(name)] + [get_method(name, **{s: True}) for s in switches]


@pytest.mark.parametrize("name", list(METHODS))
def test_the_round0_parts_a_method_declares_are_all_apply_download_reads(name):
    """An engine keeps only ``init_parts`` of a client's round-0 state (Flower: in the node's
    context): two rounds given only those parts end exactly as with the whole round-0 state,
    for every method and each of its switches."""
    for method in with_every_switch(name):
        server, states, inits = start(method, registry_states(method))
        kept = [{k: v for k, v in i.items() if k.rsplit(".", 1)[1] in method.init_parts} for i in inits]
        (whole, server_whole), (part, server_part) = (states, server), (states, server)
        for rnd in range(2):
            _, server_whole, _, whole = run_round(method, train(method, whole, rnd), inits, server_whole)
            _, server_part, _, part = run_round(method, train(method, part, rnd), kept, server_part)
            for full, lean in zip(whole, part, strict=True):
                assert full.keys() == lean.keys()
                for key in full:
                    assert torch.equal(full[key], lean[key]), f"{method}: {key} needs the round-0 state"


def test_engines_and_recipes_never_name_a_method():
    """Method knowledge lives in federated/: no method name appears as a string literal in the
    engines, the recipes or federate's config (the registry and the methods' declarations answer
    for them)."""
    import ast
    from pathlib import Path

    import asymlora

    root = Path(asymlora.__file__).parent
    found = []
    for where in ("engines", "recipes", "fedconfig.py", "data/clients.py"):
        for path in sorted((root / where).rglob("*.py")) if (root / where).is_dir() else [root / where]:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in METHODS:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not found, found


@pytest.mark.parametrize(("aggregation", "cut"), [("median", None), ("trimmed-mean", 1)])
def test_robust_aggregation_is_the_elementwise_median_or_trimmed_mean(aggregation, cut):
    """Five fedalora clients, one sending huge values: the robust aggregate of every element is
    the median (or the mean without the smallest and largest value) of the five, unweighted."""
    from statistics import fmean, median

    method = get_method("fedalora", aggregation=aggregation, trim=0.2)
    _, states, inits = start(method, lora_states([3] * 5))
    states = train(method, states)
    states[4] = {k: v * 1e6 for k, v in states[4].items()}
    uploads, server, downloads, _ = run_round(method, states, inits, {}, n_ex=[1, 2, 3, 4, 100])
    for key, got in server.items():
        values = [up[key].flatten().tolist() for up in uploads]
        for j, column in enumerate(zip(*values, strict=True)):
            ordered = sorted(column)
            want = median(ordered) if cut is None else fmean(ordered[cut : len(ordered) - cut])
            assert got.flatten()[j].item() == pytest.approx(want, abs=1e-5)
        assert got.abs().max() < 1e3, "the outlier must not reach the aggregate"
    for down in downloads:
        assert all(torch.equal(down[k], server[k]) for k in server)


def test_robust_aggregation_is_refused_where_the_server_does_not_average():
    from asymlora.config import ConfigError
    from asymlora.fedconfig import FederationConfig

    with pytest.raises(
        ConfigError, match="federation.aggregation is not an option of flora: its server stacks"
    ):
        FederationConfig(method="flora", aggregation="median")
    with pytest.raises(ConfigError, match="aggregation='mode' must be one of mean, median, trimmed-mean"):
        FederationConfig(method="fedit", aggregation="mode")
    with pytest.raises(
        ConfigError, match="central_dp='server' does not fit fedalora-het: its server accumulates"
    ):
        FederationConfig(method="fedalora-het", central_dp="server")


def test_fedalora_common_a_init_starts_every_client_from_one_a_and_keeps_training_it():
    """``client_a_init='common'``: every client starts from client 0's A (the reference's start),
    then each keeps and trains its own A across rounds (no reset)."""
    method = get_method("fedalora", client_a_init="common")
    original = lora_states([3, 3, 3])
    server, states, inits = start(method, original)
    for i in range(3):
        for mod in MODS:
            assert torch.equal(states[i][f"{mod}.lora_A"], original[0][f"{mod}.lora_A"])
    trained = train(method, states)
    _, server, _, states = run_round(method, trained, inits, server)
    for i in range(3):
        for mod in MODS:
            assert torch.equal(states[i][f"{mod}.lora_A"], trained[i][f"{mod}.lora_A"])
    assert not torch.equal(states[0]["layers.0.q_proj.lora_A"], original[0]["layers.0.q_proj.lora_A"])
    with pytest.raises(ValueError, match="client_a_init"):
        get_method("fedalora", client_a_init="shared")


def test_fedalora_het_common_init_gives_each_rank_the_leading_slice_of_the_top_ranks_draw():
    """``client_a_init='common'`` for Fed-ALoRA-het: the clients' A, M and B1 start as their
    rank's leading rows (A, B1) or columns (M, rescaled to its own fan-in) of the highest-rank
    client's; B2 and B_base as before; a kaiming draw sliced so is distributed as a fresh one."""
    from asymlora.adapters.layer import kaiming_leading, kaiming_uniform

    ranks = [2, 4, 4, 1]
    original = het_states(ranks)
    server, states, _ = start(get_method("fedalora-het", client_a_init="common"), original)
    top = original[1]  # the first client of rank 4
    for i, r in enumerate(ranks):
        for mod in MODS:
            key = f"{mod}.lora_"
            assert torch.equal(states[i][key + "A"], top[key + "A"][:r])
            assert torch.equal(states[i][key + "B1"], top[key + "B1"][:r])
            assert torch.allclose(states[i][key + "M"], top[key + "M"][:, :r] * (4 / r) ** 0.5)
            assert torch.equal(states[i][key + "B2"], original[i][key + "B2"])
            assert torch.equal(states[i][key + "B_base"], original[0][key + "B_base"])
    assert torch.equal(states[1][f"{next(iter(MODS))}.lora_M"], states[2][f"{next(iter(MODS))}.lora_M"])
    draw = kaiming_uniform((64, 4096), torch.Generator().manual_seed(0))
    columns = kaiming_leading(draw, 1, 16)
    assert columns.abs().max() <= 1 / 16**0.5 and columns.abs().max() > 0.99 / 16**0.5
    assert torch.equal(kaiming_leading(draw, 0, 16), draw[:16])
    with pytest.raises(ValueError, match="client_a_init"):
        get_method("fedalora-het", client_a_init="shared")


def test_a_common_start_is_the_default_draw_when_every_rank_is_equal():
    """For equal ranks the het method's common start is client 0's draw for everyone, as in
    Fed-ALoRA's."""
    original = het_states([3, 3, 3])
    _, states, _ = start(get_method("fedalora-het", client_a_init="common"), original)
    for state in states:
        for key, value in state.items():
            if key.rsplit(".", 1)[1] in ("lora_A", "lora_M", "lora_B1"):
                assert torch.equal(value, original[0][key])
