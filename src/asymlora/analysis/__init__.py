"""Why share B: the paper's three measurements on saved adapters and models.

- ``similarity(run_a, run_b, i, j)``: principal-angle subspace similarity of A's and of B's, per layer.
- ``change(init, final)``: magnitude and direction change of A and of B during fine-tuning.
- ``gradient_conflicts(model, batches_by_task, share)``: per-task gradient norms and conflicts on
  the shared matrix, A shared (HydraLoRA-shaped) or B shared (ALoRA-shaped);
  ``run_gradient_experiment(tasks, share, GradientExperiment(...), run_dir)`` trains such a model
  and measures it during training; ``GradientRun.prepare(tasks, shares, exp)`` checks every
  share's run first and runs them on one base (what ``asymlora analyze gradients`` does).
Each returns a JSON-able dict; ``plot_*`` write it as a PNG (needs matplotlib)."""

from .change import change
from .gradients import compare_sharing, gradient_conflicts, make_batches, task_gradients
from .metrics import count_conflicts, direction_change, pairwise_cosines, relative_change, subspace_similarity
from .plots import plot_change, plot_gradients, plot_similarity
from .sharing import GradientExperiment, GradientRun, pool_snapshots, run_gradient_experiment
from .similarity import similarity
from .weights import load_weights, resolve_adapter_folder

__all__ = [
    "change",
    "compare_sharing",
    "GradientExperiment",
    "GradientRun",
    "count_conflicts",
    "direction_change",
    "gradient_conflicts",
    "load_weights",
    "make_batches",
    "pairwise_cosines",
    "plot_change",
    "plot_gradients",
    "plot_similarity",
    "pool_snapshots",
    "relative_change",
    "resolve_adapter_folder",
    "run_gradient_experiment",
    "similarity",
    "subspace_similarity",
    "task_gradients",
]
