"""One comparison table of finished ``asymlora federate`` runs kept in different folders (an
ablation: the same method with one setting changed), paired against one of them.

Each ``--run LABEL=FOLDER`` is a federate run folder (or several, comma-separated, one per seed);
the table, JSON and plot go to ``--out`` with the same statistics as ``federate --methods``: 95 %
intervals by bootstrap over each client's test questions, paired differences against the runs
labelled by ``--against`` (the first run, unless given), and the base model and majority rows (the
base model scored once into OUT/base, or read from there). Every run must have scored the same test questions (the statistics
refuse otherwise).

    python benchmarks/fed_runs_table.py --out runs/fed-mc/wire \\
        --run float32=runs/fed-mc/homogeneous/fedalora/seed-0 \\
        --run bfloat16=runs/fed-mc/wire-bfloat16/fedalora/seed-0 \\
        --run float16=runs/fed-mc/wire-float16/fedalora/seed-0 --against float32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asymlora.config import ConfigError
from asymlora.fedconfig import load_config
from asymlora.recipes.compare import resolve_against
from asymlora.recipes.fed_compare import summarize_runs
from asymlora.runfolder import CONFIG_FILE


def parse_run(text: str) -> tuple[str, list[Path]]:
    label, sep, folders = text.partition("=")
    if not sep or not label or not folders:
        raise SystemExit(f"--run {text!r}: expected LABEL=FOLDER[,FOLDER...]")
    paths = [Path(f) for f in folders.split(",")]
    for path in paths:
        if not (path / "results.json").exists():
            raise SystemExit(f"--run {label}: {path} holds no finished run (no results.json)")
    return label, paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=FOLDER[,FOLDER...] (repeatable)")
    ap.add_argument(
        "--against", help="comma-separated labels the others are paired against (default: the first)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = dict(parse_run(text) for text in args.run)
    asked = [a.strip() for a in args.against.split(",") if a.strip()] if args.against else None
    try:
        against = resolve_against(list(runs), asked, next(iter(runs)), among="the --run labels")
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    results = {
        label: [json.loads((p / "results.json").read_text()) for p in paths] for label, paths in runs.items()
    }
    base = load_config(runs[against[0]][0] / CONFIG_FILE)
    args.out.mkdir(parents=True, exist_ok=True)
    summarize_runs(results, base, args.out, against)
    return 0


if __name__ == "__main__":
    sys.exit(main())
