"""PNG line plots across layers of the results of ``similarity``, ``change`` and
``gradient_conflicts``: one line per kind of module (q_proj, v_proj...). Needs matplotlib
(imported here only, without pyplot, so nothing global is touched)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .weights import KINDS, series_name

Row = dict[str, Any]


def require_matplotlib() -> None:
    """Refuse, with how to install it, where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None


def _figure(ncols: int):
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * ncols, 3.8), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _lines(
    ax, rows: list[Row], value: Callable[[Row], float | None], label: str = "", style: str = "-o"
) -> None:
    """One line per module kind: x the block index, y ``value(row)``; rows without either are left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        y = value(row)
        if row["layer"] is not None and y is not None:
            series.setdefault(series_name(row["module"]), []).append((row["layer"], y))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=3, label=f"{label}{name}")


def _finish(fig, axes, path: str | Path, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_similarity(result: dict[str, Any], path: str | Path) -> Path:
    """Mean phi over the compared blocks, A (row space) and B (column space), across layers."""
    fig, axes = _figure(2)
    for ax, kind in zip(axes, KINDS, strict=True):
        _lines(ax, result[kind]["modules"], lambda r: r["mean"])
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"phi(i={result['i']}, j={result['j']})")
        ax.set_title(f"{kind} ({'row' if kind == 'A' else 'column'} space)")
    return _finish(fig, axes, path, f"subspace similarity: {result['run_a']} vs {result['run_b']}")


def plot_change(result: dict[str, Any], path: str | Path) -> Path:
    """Magnitude and direction change of A (solid) and B (dashed) across layers."""
    fig, axes = _figure(2)
    for ax, key, label in zip(
        axes,
        ("mean_magnitude", "mean_direction"),
        ("magnitude change", "direction change (1 - cos)"),
        strict=True,
    ):
        for kind, style in zip(KINDS, ("-o", "--s"), strict=True):
            _lines(ax, result[kind]["modules"], lambda r, key=key: r[key], f"{kind} ", style)
        ax.set_ylabel(label)
    if all(r["mean_direction"] is None for r in result["B"]["modules"]):
        axes[1].set_title(
            "B: no direction at a zero start (compare with a later checkpoint)", fontsize="small"
        )
    return _finish(fig, axes, path, f"change from {result['init']} to {result['final']}")


def plot_gradients(results: dict[str, Any] | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Mean per-task gradient norm of A and of B, and the count of conflicting task pairs on the
    shared matrix, across layers; several results (share a, share b) overlaid."""
    results = [results] if isinstance(results, dict) else list(results)
    fig, axes = _figure(3)
    for result, style in zip(results, ("-o", "--s", ":^", "-.v"), strict=False):
        label = f"shared {result['shared_matrix']}: "
        for ax, key in zip(axes[:2], ("mean_grad_norm_A", "mean_grad_norm_B"), strict=True):
            _lines(ax, result["modules"], lambda r, key=key: r[key], label, style)
        if "layers" in result:  # pooled (run_gradient_experiment): all modules of a block together
            points = sorted((x["layer"], x["conflicts"]) for x in result["layers"] if x["layer"] is not None)
            total = sum(x["pairs"] for x in result["layers"])
            axes[2].plot([p[0] for p in points], [p[1] for p in points], style, ms=3,
                         label=f"{label}{result['total_conflicts']}/{total} in all")  # fmt: skip
        else:
            _lines(axes[2], result["modules"], lambda r: r["conflicts"], label, style)
    axes[0].set_ylabel("gradient norm of A")
    axes[1].set_ylabel("gradient norm of B")
    axes[2].set_ylabel("conflicting task pairs (shared matrix)")
    if any("layers" in r for r in results):
        pairs = max(x["pairs"] for r in results if "layers" in r for x in r["layers"])
        axes[2].set_title(f"per layer, out of {pairs} (modules x task pairs x steps)", fontsize="small")
    return _finish(fig, axes, path, "per-task gradients")
