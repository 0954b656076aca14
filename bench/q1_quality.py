"""Q1: ranking quality of popularity and the four learners, with and without local DP.

Reuses ``fedmeta.tools.compare.compare`` (same data, partitions and evaluation users per
seed). Runs are reduced in cost (stated in the section); cells that do not fit the time budget
are reported as not run, never estimated.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from bench.common import device_overrides, table
from fedmeta.tools.compare import METHODS, compare

log = logging.getLogger(__name__)

# the budgets of the README's comparison tables, so the no-DP rows reproduce them
REDUCED = {"synthetic": ["runtime.rounds=5", "algorithm.local_steps=5", "data.max_eval_users=50"],
           "real_cross_domain": ["runtime.rounds=3", "algorithm.local_steps=5",
                                 "data.max_eval_users=30"]}
QUICK = ["data=synthetic_small", "runtime.rounds=1", "algorithm.local_steps=1",
         "data.max_eval_users=5", "algorithm.users_per_step=4"]
DP = ["privacy=local", "privacy.local.target_epsilon=8"]
WITHHELD = "stays on the node"
COLS = [("cold", "ndcg@10"), ("cold", "hr@10"), ("warm", "ndcg@10"), ("warm", "hr@10")]


def cell_overrides(base: list[str], data: list[str], dp: list[str]) -> list[str]:
    """One grid cell's overrides: its budget, data set and privacy, on the bench device."""
    return [*base, *data, *dp, *device_overrides()]


def run(quick: bool, echo=print, budget_s: float = 3000.0) -> str:
    datasets = [("synthetic", [])] if quick else [("synthetic", []),
                                                  ("real_cross_domain", ["data=real_cross_domain"])]
    seeds = [0] if quick else [0, 1, 2]
    methods = ["popularity", "fedavg"] if quick else METHODS
    deadline = time.time() + budget_s
    rows = []
    for name, data in datasets:
        base = QUICK if quick else REDUCED[name]
        for dp_name, dp in (("none", ["privacy=none"]), ("local eps=8", DP)):
            for method in methods:
                if method == "popularity" and dp == DP:
                    continue   # no training, nothing to privatise
                label = [name, dp_name, method]
                if time.time() > deadline:
                    rows.append(label + ["not run (time)"] * len(COLS) + [0])
                    continue
                try:
                    with tempfile.TemporaryDirectory(prefix="bench-q1-") as tmp:
                        frame = compare([method], seeds, cell_overrides(base, data, dp), Path(tmp),
                                        jobs=1 if quick else 2,
                                        echo=lambda s: log.info("%s", s))
                except Exception as err:   # a failing cell is reported, the grid goes on
                    log.exception("Q1 cell %s failed", label)
                    rows.append(label + [f"failed: {type(err).__name__}"] * len(COLS) + [0])
                    continue
                cells = []
                for p, m in COLS:
                    if p == "warm" and dp == DP:   # a DP node keeps its training users' metrics
                        cells.append(WITHHELD)
                        continue
                    col = frame[f"{p}/{m}"]
                    sd = float(col.std(ddof=1)) if len(col) > 1 else 0.0
                    cells.append(f"{col.mean():.4f} ± {sd:.4f}")
                rows.append(label + cells + [len(frame)])
                echo(f"Q1 {' '.join(label)}: {cells[0]} ({frame['seconds'].sum():.0f}s)")
    return "\n".join([
        "## Q1 Quality",
        "",
        f"After-adaptation NDCG@10 / HR@10 (full-catalogue ranking), mean ± std over seeds "
        f"{seeds} (the `seeds` column says how many finished), via `fedmeta.tools.compare` "
        f"(two seeds side by side, one torch thread each). Reduced cost, otherwise the defaults: "
        + ("; ".join(f"{n}: `{' '.join(QUICK if quick else REDUCED[n])}`" for n, _ in datasets))
        + f" (the budgets of the README's comparison tables, whose no-DP rows these reproduce); "
        f"DP rows add `{' '.join(DP)}`; every cell adds `{' '.join(device_overrides())}`. "
        "Popularity has no DP row (it trains nothing).",
        "",
        "```", f"fedmeta-bench --only Q1{' --quick' if quick else ''}", "```",
        "",
        table(["data", "privacy", "method", "cold NDCG@10", "cold HR@10", "warm NDCG@10",
               "warm HR@10", "seeds"], rows),
    ])
