"""``fedmeta-compare``: baselines vs FedAvg+fine-tune vs meta-learners, over several seeds.

Every method sees the same data, partitions and evaluation users for a given seed (the
seed drives data generation, partitioning, model initialisation and sampling). Learners
run in the in-process runtime; ``popularity``, ``item-knn`` and ``ease`` are scored from
the same clients' tasks (:mod:`fedmeta.eval.baselines`); ``centralised`` trains the FedAvg
model on the training silos pooled and evaluates it with every client's own node
(:mod:`fedmeta.tools.centralised`, privacy off). Prints mean ± std over seeds of NDCG@10 /
HR@10 after adaptation for cold-start users, new-client users and warm users, and writes
the per-seed rows.

Usage: ``fedmeta-compare [--seeds 0 1 2] [--methods popularity fedavg ...] [--out DIR]
[hydra overrides ...]``, e.g. ``fedmeta-compare data=real_cross_domain runtime.rounds=20``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import pandas as pd

from fedmeta.config import ConfigError
from fedmeta.data.schema import DataError
from fedmeta.eval.baselines import BASELINES, CatalogueTooLarge, baseline_rows
from fedmeta.runtime.federation import build_silos, load_data
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.inprocess import build_nodes, run
from fedmeta.runtime.node import build_tasks
from fedmeta.runtime.results import domain_table

# the default selection: the quality table's rows, cheap baselines first (a refusal, e.g.
# EASE on a catalogue too large for it, then stops the comparison before any training)
METHODS = [*BASELINES, "centralised", "fedavg", "reptile", "fomaml", "maml", "perfedavg"]
REPORT = [("cold", "ndcg@10"), ("cold", "hr@10"), ("new-client", "ndcg@10"),
          ("new-client", "hr@10"), ("warm", "ndcg@10"), ("warm", "hr@10")]
# before adaptation, beside the after-adaptation columns: does the fine-tuning help?
BEFORE = [("cold", "ndcg@10"), ("new-client", "ndcg@10"), ("warm", "ndcg@10")]


def overall(table: pd.DataFrame, stage: str = "after") -> dict[tuple[str, str], float]:
    """User-weighted mean over domains, after adaptation (or ``stage="before"``: the model as
    trained, before the evaluation's fine-tuning; the baselines have no fine-tuning, so their
    two stages are the same numbers)."""
    t = table[table["stage"] == stage].copy()
    t["w"] = t["value"] * t["users"]
    g = t.groupby(["population", "metric"])[["w", "users"]].sum()
    return {k: row["w"] / row["users"] for k, row in g.iterrows() if row["users"] > 0}


def run_one(method: str, seed: int, overrides: list[str], out: Path) -> dict:
    """One (method, seed) cell; a process of its own when run with --jobs."""
    t0 = time.time()
    base = compose(["runtime=inprocess", f"seed={seed}", "runtime.plots=false", *overrides])
    data = load_data(base)
    if method in BASELINES:
        from fedmeta.runtime.results import Recorder

        rec = Recorder()
        clients = [build_tasks(base, silo) for silo in build_silos(base, data)]
        rec.eval_rows([{**r, "round": 0} for r in baseline_rows(method, clients, seed)])
        table = domain_table(rec.frame())
    elif method == "centralised":
        from fedmeta.tools.centralised import run_centralised

        cfg = compose(["runtime=inprocess", f"seed={seed}", "algorithm=fedavg",
                       "runtime.plots=false", *overrides])
        run_dir = out / method / f"seed{seed}"
        run_centralised(cfg, build_silos(cfg, data), run_dir)
        table = domain_table(pd.read_csv(run_dir / "metrics.csv"))
    else:
        cfg = compose(["runtime=inprocess", f"seed={seed}", f"algorithm={method}",
                       "runtime.plots=false", *overrides])
        run_dir = out / method / f"seed{seed}"
        run(cfg, run_dir, nodes=build_nodes(cfg, run_dir, build_silos(cfg, data)),
            echo=lambda s: None)
        table = domain_table(pd.read_csv(run_dir / "metrics.csv"))
    vals = overall(table)
    rec = {"method": method, "seed": seed, "seconds": time.time() - t0}
    rec.update({f"{p}/{m}": vals.get((p, m), float("nan")) for p, m in REPORT})
    before = overall(table, "before")
    rec.update({f"before/{p}/{m}": before.get((p, m), float("nan")) for p, m in BEFORE})
    return rec


def _run_cell(args: tuple) -> dict:
    return run_one(*args)


def compare(methods: list[str], seeds: list[int], overrides: list[str], out: Path,
            jobs: int = 1, echo=print) -> pd.DataFrame:
    cells = [(m, s) for s in seeds for m in methods]
    for m, s in cells[:1]:
        algorithm = m if m not in (*BASELINES, "centralised") else "fedavg"
        compose(["runtime=inprocess", f"seed={s}", f"algorithm={algorithm}",
                 *overrides])   # fail on a bad override before any work
    records = []

    def report(rec):
        records.append(rec)
        echo(f"seed {rec['seed']} {rec['method']:<10} cold ndcg@10 {rec['cold/ndcg@10']:.4f} "
             f"hr@10 {rec['cold/hr@10']:.4f} ({rec['seconds']:.0f}s)")

    if jobs <= 1:
        for m, s in cells:
            report(run_one(m, s, overrides, out))
    else:
        import multiprocessing as mp

        threaded = [*overrides, "runtime.threads=1"]
        # a Pool, not an executor: leaving the block (done, a failed cell or Ctrl-C)
        # terminates the workers at once instead of waiting for their running cells
        with mp.get_context("spawn").Pool(jobs) as pool:
            for rec in pool.imap_unordered(_run_cell, [(m, s, threaded, out) for m, s in cells]):
                report(rec)
    frame = pd.DataFrame(records).sort_values(["method", "seed"]).reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "compare_runs.csv", index=False)
    return frame


def table_markdown(frame: pd.DataFrame) -> str:
    cols = [f"{p}/{m}" for p, m in REPORT] + [f"before/{p}/{m}" for p, m in BEFORE]
    names = [f"{p} {m}" for p, m in REPORT] + [f"{p} {m} before" for p, m in BEFORE]
    lines = ["| method | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(cols)]
    order = [m for m in METHODS if m in set(frame["method"])] + sorted(
        set(frame["method"]) - set(METHODS))
    for method in order:
        g = frame[frame["method"] == method]
        # n/a: not measured, e.g. warm users under DP, whose metrics stay on their node
        cells = ["n/a" if c not in g or g[c].isna().all() else
                 f"{g[c].mean():.4f} ± {g[c].std(ddof=1) if len(g) > 1 else 0.0:.4f}"
                 for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: without this the process
    dies at once and its ``--jobs`` worker processes run on, orphaned, to the end of their
    cells; as SystemExit it leaves the pool's block, which terminates them."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmeta-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS,
                        help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="(method, seed) runs in parallel, one torch thread each")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=real_cross_domain")
    args = parser.parse_args(argv)
    # "--methods a b key=value": argparse gives the overrides to --methods; a method name
    # never contains "=", so they go back where they belong, in their order
    args.overrides = [m for m in args.methods if "=" in m] + list(args.overrides)
    args.methods = [m for m in args.methods if "=" not in m]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedmeta.algorithms.registry import names

    known = [*BASELINES, "centralised", *names()]
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        print(f"fedmeta-compare: unknown method(s) {unknown}; choose from {known}",
              file=sys.stderr)
        return 2
    exit_on_sigterm()
    try:
        frame = compare(args.methods, args.seeds, args.overrides, args.out, args.jobs)
    except (ConfigError, DataError, CatalogueTooLarge) as err:
        print(f"fedmeta-compare: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the worker pool is already gone (compare left its block)
        print("fedmeta-compare: interrupted; no table written", file=sys.stderr)
        return 130
    text = table_markdown(frame)
    (args.out / "compare_table.md").write_text(text + "\n")
    print(f"\nmean ± std over seeds {args.seeds} (after adaptation unless marked "
          "before, full-catalogue ranking):\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
