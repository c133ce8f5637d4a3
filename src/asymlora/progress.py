"""Progress bars (tqdm, on stderr) for training steps, evaluation batches, federated clients and
compare cells: every bar asymlora draws is made here.

Shown when stderr is a terminal, so that logs and captured output stay clean.
``ASYMLORA_PROGRESS=1`` shows them anywhere, drawn at every step (for log files), and
``ASYMLORA_PROGRESS=0`` hides them."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

ENV = "ASYMLORA_PROGRESS"


def progress_bar(*, enabled: bool = True, **options: Any) -> tqdm:
    setting = os.environ.get(ENV, "").strip()
    if not enabled or setting == "0":
        options["disable"] = True
    elif setting == "1":
        options |= {"disable": False, "mininterval": 0}
    else:
        options["disable"] = None  # tqdm: only on a terminal
    return tqdm(dynamic_ncols=True, **options)
