"""The analysis toolkit on constructed matrices with known answers, and on tiny saved adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from asymlora import save_adapter, wrap
from asymlora.analysis import (
    change,
    count_conflicts,
    direction_change,
    gradient_conflicts,
    make_batches,
    pairwise_cosines,
    plot_change,
    plot_gradients,
    plot_similarity,
    relative_change,
    similarity,
    subspace_similarity,
    task_gradients,
)
from asymlora.analysis.metrics import norm_change
from asymlora.analysis.weights import directions, load_weights, resolve_adapter_folder, series_name
from asymlora.train.batches import Example
from tiny_models import randomize_adapters, tiny_model, tiny_tokenizer

D = 20


def orthonormal(n: int = D, seed: int = 0) -> torch.Tensor:
    """A random n x n orthogonal matrix (float64): its rows are an orthonormal basis."""
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mixed(rows: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Another basis of the same row space: a random invertible (non-orthogonal) mix of the rows."""
    return (randn(rows.shape[0], rows.shape[0], seed=seed) + 3 * torch.eye(rows.shape[0])) @ rows


# --- subspace similarity -------------------------------------------------------------------------


def test_identical_subspaces_give_one():
    x = randn(4, D)
    for i, j in [(1, 1), (2, 3), (4, 4), (4, 1)]:
        assert subspace_similarity(x, x, i, j) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero():
    q = orthonormal()
    assert subspace_similarity(mixed(q[:4]), mixed(q[4:8], seed=3), 4, 4) == pytest.approx(0.0, abs=1e-12)


def test_rotated_basis_gives_one_for_a_and_b():
    r = orthonormal(4, seed=7)  # an orthogonal r x r matrix
    a = randn(4, D)  # A: (r, d_in)
    assert subspace_similarity(a, r @ a, 4, 4) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(a, r @ a, 2, 2) == pytest.approx(1.0, abs=1e-12)  # same singular vectors
    b = randn(D, 4, seed=5)  # B: (d_out, r), compared by its column space
    assert subspace_similarity(directions("B", b), directions("B", b @ r), 4, 4) == pytest.approx(
        1.0, abs=1e-12
    )
    # B's row space lives in the rank coordinates: a rotation there is invisible, as it should be,
    # while a different column space is not
    assert subspace_similarity(directions("B", b), directions("B", randn(D, 4, seed=6)), 4, 4) < 0.6


def test_partial_overlap_gives_the_known_fraction():
    q = orthonormal()
    x = mixed(q[0:4])
    assert subspace_similarity(x, mixed(q[2:6], seed=4), 4, 4) == pytest.approx(2 / 4)
    assert subspace_similarity(x, mixed(q[[0, 5, 6, 7]], seed=4), 4, 4) == pytest.approx(1 / 4)
    assert subspace_similarity(x, mixed(q[0:2], seed=4), 4, 2) == pytest.approx(1.0)  # divided by min(i, j)
    theta = 0.3  # one direction at angle theta: phi = cos^2 theta
    y = (math.cos(theta) * q[0] + math.sin(theta) * q[9]).unsqueeze(0)
    assert subspace_similarity(q[0:1], y, 1, 1) == pytest.approx(math.cos(theta) ** 2)


def test_rank_deficient_and_out_of_range():
    x = randn(4, D)
    assert subspace_similarity(torch.zeros(4, D), x, 4, 4) is None  # a B at its zero init
    assert subspace_similarity(x, x, 4, 4) is not None
    with pytest.raises(ValueError, match="i=5"):
        subspace_similarity(x, x, 5, 4)
    with pytest.raises(ValueError, match="cannot compare"):
        subspace_similarity(x, randn(4, D + 1), 4, 4)


# --- change --------------------------------------------------------------------------------------


def test_known_magnitude_and_direction_changes():
    w = randn(4, D)
    assert relative_change(w, 2 * w) == pytest.approx(1.0)
    assert direction_change(w, 2 * w) == pytest.approx(0.0, abs=1e-12)
    assert relative_change(w, -w) == pytest.approx(2.0)
    assert direction_change(w, -w) == pytest.approx(2.0)
    q = orthonormal()
    assert direction_change(q[:4], q[4:8]) == pytest.approx(1.0)  # every row turned orthogonal
    half = torch.cat([q[:2], -q[2:4]])  # two rows kept, two reversed: mean of 0, 0, 2, 2
    assert direction_change(q[:4], half) == pytest.approx(1.0)
    assert norm_change(w, w + 3 * q[:4]) == pytest.approx(6.0)  # ||3 Q_4||_F = 3 * 2
    zero = torch.zeros(4, D)
    assert relative_change(zero, w) is None and direction_change(zero, w) is None


# --- gradient conflicts --------------------------------------------------------------------------


def test_constructed_conflicting_pair_is_counted_and_agreeing_pair_is_not():
    g = randn(6, 5)
    agree = g + 0.1 * randn(6, 5, seed=9)
    conflict = -g + 0.1 * randn(6, 5, seed=10)
    cos = pairwise_cosines({0: g, 1: agree})
    assert cos[0][:2] == [0, 1] and cos[0][2] > 0.9 and count_conflicts(cos) == 0
    cos = pairwise_cosines({0: g, 1: conflict})
    assert cos[0][2] < -0.9 and count_conflicts(cos) == 1
    cos = pairwise_cosines({0: g, 1: agree, 2: conflict})  # pairs (0,1) agree, (0,2) and (1,2) conflict
    assert [c[:2] for c in cos] == [[0, 1], [0, 2], [1, 2]] and count_conflicts(cos) == 2
    assert count_conflicts(pairwise_cosines({0: g, 1: torch.zeros(6, 5)})) == 0  # no direction, no conflict


def examples(task: int) -> list[Example]:
    words = ["red", "blue", "green", "gold"] if task == 0 else ["one", "two", "three", "four"]
    return [Example(f"q{task} {w}?", f" {w[::-1]}", task) for w in words]


@pytest.fixture(scope="module")
def task_batches():
    return make_batches(tiny_tokenizer(), [examples(0), examples(1)], batch_size=2, max_length=32)


@pytest.mark.parametrize(
    ("share", "method", "shared", "own"), [("a", "hydralora", "A", "B"), ("b", "alora", "B", "A")]
)
def test_gradients_on_a_tiny_model(task_batches, share, method, shared, own):
    model = wrap(
        tiny_model("llama"),
        method=method,
        num_experts=2,
        r=4,
        router="task",
        target_modules=["q_proj", "v_proj"],
    )
    randomize_adapters(model)
    model.train()
    result = gradient_conflicts(model, task_batches, share=share)
    assert model.training, "the model's mode is restored"
    assert all(p.grad is None for p in model.parameters()), ".grad fields are left alone"
    assert result["shared_matrix"] == shared and len(result["modules"]) == 4  # 2 layers x q, v
    json.dumps(result)  # JSON-able
    grads = {t: task_gradients(model, task_batches[t], t) for t in (0, 1)}
    for row in result["modules"]:
        for key in ("grad_norm_A", "grad_norm_B"):
            assert all(math.isfinite(v) and v > 0 for v in row[key])
        # the cosine is that of the two tasks' gradients on the shared matrix, counted when negative
        g0, g1 = grads[0][row["module"]][shared], grads[1][row["module"]][shared]
        expected = float(torch.nn.functional.cosine_similarity(g0.flatten(), g1.flatten(), dim=0))
        assert row["pairs"] == 1 and row["cosines"][0][2] == pytest.approx(expected, abs=1e-6)
        assert row["conflicts"] == int(expected < 0)
        # each task's gradient on the unshared matrix touches only its own block
        r = 4
        for t in (0, 1):
            g = grads[t][row["module"]][own]
            g = g if own == "A" else g.T  # blocks along rows
            assert g[t * r : (t + 1) * r].abs().sum() > 0 and g[(1 - t) * r : (2 - t) * r].abs().sum() == 0
    assert result["total_conflicts"] == sum(r["conflicts"] for r in result["modules"])
    # the gradient of the mean token loss: the same whether the examples come in one batch or two
    whole = make_batches(tiny_tokenizer(), [examples(0)], batch_size=4, max_length=32)[0]
    assert len(whole) == 1 and len(task_batches[0]) == 2
    one, two = task_gradients(model, whole, 0), task_gradients(model, task_batches[0], 0)
    twice = task_gradients(model, whole + whole, 0)  # a mean: the same examples twice change nothing
    for module in one:
        for kind in ("A", "B"):
            torch.testing.assert_close(one[module][kind], two[module][kind], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(one[module][kind], twice[module][kind], rtol=1e-4, atol=1e-7)
    # batches are routed to the task they are given for, whatever their task_ids say
    moved = task_gradients(model, task_batches[0], 1)
    for module in moved:
        g = moved[module][own] if own == "A" else moved[module][own].T
        assert g[:r].abs().sum() == 0 and g[r:].abs().sum() > 0


def test_gradients_refuse_the_wrong_shape_and_see_a_zero_gradient_at_init(task_batches):
    model = wrap(
        tiny_model("llama"), method="alora", num_experts=2, r=4, router="task", target_modules=["q_proj"]
    )
    with pytest.raises(ValueError, match="hydralora"):
        gradient_conflicts(model, task_batches, share="a")
    fresh = wrap(
        tiny_model("llama"), method="hydralora", num_experts=2, r=4, router="task", target_modules=["q_proj"]
    )
    result = gradient_conflicts(fresh, task_batches, share="a")  # B = 0: the shared A gets no gradient
    assert all(v == 0 for row in result["modules"] for v in row["grad_norm_A"])
    assert result["total_conflicts"] == 0 and all(row["cosines"][0][2] is None for row in result["modules"])


# --- folders -------------------------------------------------------------------------------------


def alora(seed: int = 0, init_a: str = "independent"):
    return wrap(
        tiny_model("llama"),
        method="alora",
        num_experts=2,
        r=4,
        router="task",
        seed=seed,
        init_a=init_a,
        target_modules=["q_proj", "v_proj"],
    )


def edit(model, fn) -> None:
    """Replace every module's (A, B) by fn(name, A, B)."""
    with torch.no_grad():
        for name, layer in model.adapted.items():
            a, b = fn(name, layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)


def test_change_from_saved_folders(tmp_path):
    model = alora()
    init = save_adapter(model, tmp_path / "init")
    randomize_adapters(model)
    edit(
        model, lambda n, a, b: (2 * load_weights(init).tensors[f"{n}.lora_A"], b)
    )  # A doubled, B moved from 0
    save_adapter(model, tmp_path / "run" / "adapter")
    result = change(init, tmp_path / "run")  # a run folder holding adapter/
    json.dumps(result)
    assert len(result["A"]["modules"]) == 4
    for row in result["A"]["modules"]:
        assert row["magnitude"] == pytest.approx([1.0, 1.0]) and row["relative"] == pytest.approx([1.0, 1.0])
        assert row["direction"] == pytest.approx([0.0, 0.0], abs=1e-6)
    a0 = load_weights(init).tensors
    for row in result["B"]["modules"]:
        b1 = model.adapted[row["module"]].lora_B.detach()
        a_scale = float(a0[f"{row['module']}.lora_A"].norm()) / math.sqrt(2)
        assert row["relative"] == [None] and row["direction"] == [None]  # B starts at zero
        assert row["norm_change"] == pytest.approx([float(b1.norm())], rel=1e-5)
        assert row["magnitude"] == pytest.approx([float(b1.norm()) / a_scale], rel=1e-5)
    # against a later reference, B's direction is defined: negating it gives 2
    edit(model, lambda n, a, b: (a, -b))
    later = change(tmp_path / "run", save_adapter(model, tmp_path / "neg"))
    assert all(row["direction"] == pytest.approx([2.0]) for row in later["B"]["modules"])
    assert all(row["magnitude"] == [0.0, 0.0] for row in later["A"]["modules"])
    plot = plot_change(result, tmp_path / "change.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_similarity_from_saved_folders(tmp_path):
    model = alora(seed=0)
    randomize_adapters(model)
    run_a = save_adapter(model, tmp_path / "a")
    rot = orthonormal(4, seed=11).float()

    def rotate(name, a, b):  # expert k: (R A_k, B R^T): same subspaces, same product for a K=1 model
        return torch.cat([rot @ blk for blk in a.split(4)]), b @ rot.T

    edit(model, rotate)
    run_b = save_adapter(model, tmp_path / "b")
    same = similarity(run_a, run_b)
    json.dumps(same)
    assert (
        same["experts"] == [[0, 0], [1, 1]]
        and same["A"]["blocks"] == [[0, 0], [1, 1]]
        and same["B"]["blocks"] == [[0, 0]]
    )
    for kind in ("A", "B"):
        for row in same[kind]["modules"]:
            assert row["mean"] == pytest.approx(1.0, abs=1e-5) and all(
                p == pytest.approx(1.0, abs=1e-5) for p in row["phi"]
            )
            assert series_name(row["module"]) in ("self_attn.q_proj", "self_attn.v_proj")
    other_seed = alora(seed=1)
    randomize_adapters(other_seed, seed=6)
    run_c = save_adapter(other_seed, tmp_path / "c")
    different = similarity(run_a, run_c, i=2, j=2)
    assert different["i"] == 2 and all(
        row["mean"] < 0.7 for k in ("A", "B") for row in different[k]["modules"]
    )
    # two experts of one run; identical A's at init are alike, independent ones are not
    ident = save_adapter(alora(init_a="identical"), tmp_path / "ident")
    within = similarity(ident, ident, expert_a=0, expert_b=1)
    assert within["A"]["blocks"] == [[0, 1]] and all(
        r["phi"] == [pytest.approx(1.0)] for r in within["A"]["modules"]
    )
    assert all(r["phi"] == [None] for r in within["B"]["modules"])  # zero B: no subspace
    indep = similarity(save_adapter(alora(), tmp_path / "indep"), tmp_path / "indep", expert_a=0, expert_b=1)
    assert all(r["phi"][0] < 0.7 for r in indep["A"]["modules"])
    plot = plot_similarity(same, tmp_path / "plots" / "similarity.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folder_errors_and_gradient_plot(tmp_path, task_batches):
    with pytest.raises(FileNotFoundError, match="no adapter here"):
        resolve_adapter_folder(tmp_path)
    run = save_adapter(alora(), tmp_path / "x" / "checkpoint")
    assert resolve_adapter_folder(tmp_path / "x") == run
    with pytest.raises(ValueError, match="i=9"):
        similarity(run, run, i=9)
    lora = wrap(tiny_model("llama"), method="lora", r=4, target_modules=["q_proj", "v_proj"])
    three = wrap(tiny_model("llama"), method="alora", num_experts=3, r=4, target_modules=["q_proj", "v_proj"])
    paired = similarity(save_adapter(lora, tmp_path / "lora"), run)  # one expert against each of two
    assert paired["experts"] == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="choose which"):
        similarity(save_adapter(three, tmp_path / "three"), run)
    with pytest.raises(ValueError, match="not the same adapter"):
        change(run, tmp_path / "three")
    results = []
    for share, method in (("a", "hydralora"), ("b", "alora")):
        model = wrap(
            tiny_model("llama"), method=method, num_experts=2, r=4, router="task", target_modules=["q_proj"]
        )
        randomize_adapters(model)
        results.append(gradient_conflicts(model, task_batches, share))
    plot = plot_gradients(results, tmp_path / "gradients.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
