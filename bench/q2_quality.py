"""Q2: the quality table against baselines: does any federated learner beat popularity and
item-kNN, do meta-learners beat FedAvg + fine-tuning, how close is the centralised model to
a published sequential recommender (RecBole's SASRec) on the same split.

One markdown table per data set (rows: ``popularity``, ``item-knn``, ``ease``, ``centralised``,
``fedavg``, ``reptile``, ``fomaml``, ``maml``, ``perfedavg``, ``recbole-sasrec``; columns
``cold ndcg@10``, ``new-client ndcg@10``, ``warm ndcg@10``; mean ± std over seeds), every
row from :func:`fedmeta.tools.compare.compare` (same data, partitions and evaluation users per
seed) except the peer's (:mod:`bench.q_recbole`, its own venv). Each target of the quality
issue is then computed from the table: met, missed (by how much) or not measured. Cells that
do not start within the time budget are reported as not run, never estimated.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

from bench.common import device_overrides, on_cuda, table

log = logging.getLogger(__name__)

POPULATIONS = ("cold", "new-client", "warm")
FEDERATED = ("fedavg", "reptile", "fomaml", "maml", "perfedavg")
META = ("reptile", "fomaml", "maml", "perfedavg")
BASELINE_ROWS = ("popularity", "item-knn")
PEER = "recbole-sasrec"

# (name, overrides): the default budgets of each preset, evaluation users capped so a seed of
# every method fits the budget on 2 cores; stated in the section
DATASETS = {
    "synthetic": ["data.max_eval_users=100"],
    "real_cross_domain": ["data=real_cross_domain", "data.max_eval_users=50"],
    "ml100k": ["data=ml100k", "data.max_eval_users=100"],
}
QUICK = {"synthetic": ["data=synthetic_small", "runtime.rounds=1", "algorithm.local_steps=1",
                       "data.max_eval_users=5", "algorithm.users_per_step=4"]}
COMMON = ["privacy=none"]
DP_CURVE = "dp-curve"      # target (d), selectable like a data set
PARTS = (*DATASETS, DP_CURVE)


def experiment_overrides(data: list[str]) -> list[str]:
    """A data set's overrides for every row: no DP, fedmeta's rows on the bench device."""
    return [*COMMON, *device_overrides(), *data]


def share(left_s: float, datasets_left: int) -> float:
    """The seconds one data set may spend: an equal part of what is left of the budget."""
    return max(left_s, 0.0) / max(datasets_left, 1)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, sd


def summarise(records: list[dict]) -> dict[str, dict]:
    """``{method: {population: (mean, sd), "seeds": n}}`` from per-seed records whose keys are
    ``"<population>/ndcg@10"`` (compare's format)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        out[method] = {p: _mean_sd([float(r.get(f"{p}/ndcg@10", float("nan"))) for r in rs])
                       for p in POPULATIONS}
        # the model as trained, before the evaluation's fine-tuning (baselines: the same)
        out[method].update({f"before/{p}": _mean_sd(
            [float(r.get(f"before/{p}/ndcg@10", float("nan"))) for r in rs])
            for p in POPULATIONS})
        out[method]["seeds"] = len(rs)
    return out


def _fmt(ms: tuple[float, float]) -> str:
    mean, sd = ms
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {sd:.4f}"


def _best(summary: dict, methods, population: str) -> tuple[str | None, tuple[float, float]]:
    have = [(m, summary[m][population]) for m in methods
            if m in summary and not math.isnan(summary[m][population][0])]
    if not have:
        return None, (float("nan"), float("nan"))
    return max(have, key=lambda kv: kv[1][0])


def where_the_gap_is(summary: dict, meta: str) -> str:
    """Why (b) missed, as far as the table can tell: is the meta-learner behind FedAvg already
    as trained (the gap is in meta-training) or only after the evaluation's fine-tuning (the
    adaptation is what loses)?"""
    mb, fb = summary[meta]["before/cold"][0], summary["fedavg"]["before/cold"][0]
    ma, fa = summary[meta]["cold"][0], summary["fedavg"]["cold"][0]
    if math.isnan(mb) or math.isnan(fb):
        return "(b) where the gap is: not measured (no before-adaptation numbers)"
    place = ("already as trained: the gap is in meta-training" if mb < fb else
             "only after fine-tuning: the adaptation is what loses")
    return (f"(b) where the gap is: before adaptation {meta} {mb:.4f} vs fedavg {fb:.4f}, after "
            f"{ma:.4f} vs {fa:.4f}; {meta} is behind {place}; its fine-tuning changes cold "
            f"NDCG@10 by {(ma / mb - 1) * 100:+.0f} % (fedavg's by {(fa / fb - 1) * 100:+.0f} %)")


def verdicts(name: str, summary: dict) -> list[str]:
    """The issue's targets (a)-(c) on this data set's table: met / missed by how much /
    not measured (which rows are missing)."""
    lines = []
    if name in ("synthetic", "real_cross_domain"):
        for pop in POPULATIONS:
            best, (bm, _) = _best(summary, FEDERATED, pop)
            refs = [(b, summary[b][pop][0]) for b in BASELINE_ROWS if b in summary]
            refs = [(b, v) for b, v in refs if not math.isnan(v)]
            if best is None or len(refs) < len(BASELINE_ROWS):
                lines.append(f"(a) {pop}: not measured (a learner or a baseline row is missing)")
                continue
            top, tv = max(refs, key=lambda kv: kv[1])
            ok = bm > tv
            lines.append(f"(a) {pop}: best federated learner {best} {bm:.4f} vs {top} {tv:.4f}: "
                         + ("**met**" if ok else f"**missed** ({(bm / tv - 1) * 100:+.0f} %)"))
        best, (mm, msd) = _best(summary, META, "cold")
        if best is None or "fedavg" not in summary:
            lines.append("(b) not measured (a meta-learner or fedavg row is missing)")
        else:
            fm, fsd = summary["fedavg"]["cold"]
            rel = mm / fm - 1 if fm > 0 else float("inf")
            ok = rel >= 0.10 and mm - msd > fm + fsd
            lines.append(f"(b) cold: best meta-learner {best} {mm:.4f} ± {msd:.4f} vs fedavg "
                         f"{fm:.4f} ± {fsd:.4f} ({rel * 100:+.0f} %; target >= +10 % and "
                         f"mean - std above fedavg's mean + std): "
                         + ("**met**" if ok else "**missed**"))
            if not ok:
                lines.append(where_the_gap_is(summary, best))
    if name == "ml100k":
        pop = "cold"
        peer = summary.get(PEER, {}).get(pop, (float("nan"),))[0]
        cen = summary.get("centralised", {}).get(pop, (float("nan"),))[0]
        best, (bm, _) = _best(summary, FEDERATED, pop)
        if math.isnan(peer) or math.isnan(cen):
            lines.append("(c) centralised within 10 % of RecBole SASRec: not measured "
                         "(a row is missing)")
        else:
            lines.append(f"(c) cold: centralised {cen:.4f} vs RecBole SASRec {peer:.4f} "
                         f"({(cen / peer - 1) * 100:+.0f} %; target >= -10 %): "
                         + ("**met**" if cen >= 0.9 * peer else "**missed**"))
        if best is None or math.isnan(cen):
            lines.append("(c) federated within 15 % of centralised: not measured")
        else:
            lines.append(f"(c) cold: best federated {best} {bm:.4f} vs centralised {cen:.4f} "
                         f"({(bm / cen - 1) * 100:+.0f} %; target >= -15 %): "
                         + ("**met**" if bm >= 0.85 * cen else "**missed**"))
    return lines


def selected(parts: list[str] | None, quick: bool) -> tuple[dict, bool, list[str]]:
    """The data sets and whether the DP curve run, from ``--q2-data`` (``None``: all); and
    the parts left out, which the section names so a partial run never reads as a whole one."""
    every = QUICK if quick else DATASETS
    if parts is None:
        return dict(every), True, []
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--q2-data: unknown part(s) {unknown}; choose among {list(PARTS)}")
    datasets = {n: o for n, o in every.items() if n in parts}
    left_out = [p for p in PARTS if p not in parts and (p in every or p == DP_CURVE)]
    return datasets, DP_CURVE in parts, left_out


def run(quick: bool, echo=print, budget_s: float = 6000.0, seeds: list[int] | None = None,
        parts: list[str] | None = None) -> str:
    from fedmeta.tools.compare import METHODS, compare

    datasets, with_curve, left_out = selected(parts, quick)
    seeds = seeds or ([0] if quick else [0, 1, 2])
    methods = ["popularity", "item-knn", "fedavg"] if quick else METHODS
    final = time.time() + budget_s
    out = []
    names = list(datasets)
    for i, (name, data) in enumerate(datasets.items()):
        # each data set (and the DP curve, when chosen) gets an equal share of what is left,
        # so one slow peer run (RecBole trains to its early stop) cannot starve the parts
        # after it; the curve then runs on whatever the data sets left
        deadline = time.time() + share(final - time.time(), len(names) - i + with_curve)
        overrides = experiment_overrides(data)
        records, skipped = [], []
        for method in methods:
            if time.time() > deadline:
                skipped.append(method)
                continue
            try:
                with tempfile.TemporaryDirectory(prefix="bench-q2-") as tmp:
                    frame = compare([method], seeds, overrides, Path(tmp),
                                    jobs=1 if quick else 2, echo=lambda s: log.info("%s", s))
            except Exception as err:   # a failing cell is reported, the table goes on
                log.exception("Q2 %s %s failed", name, method)
                skipped.append(f"{method} (failed: {type(err).__name__}: {err})")
                continue
            records += frame.to_dict("records")
            echo(f"Q2 {name} {method}: cold ndcg@10 {frame['cold/ndcg@10'].mean():.4f} "
                 f"({frame['seconds'].sum():.0f}s)")
        if not quick and time.time() < deadline:
            try:
                from bench.q_recbole import run_recbole

                for r in _peer_records(run_recbole(overrides, seeds, echo,
                                                   deadline - time.time())):
                    records.append(r)
            except Exception as err:
                log.exception("Q2 %s peer failed", name)
                skipped.append(f"{PEER} (failed: {type(err).__name__}: {err})")
        elif not quick:
            skipped.append(PEER)
        summary = summarise(records)
        rows = [[m, *(_fmt(summary[m][p]) for p in POPULATIONS),
                 *(_fmt(summary[m][f"before/{p}"]) for p in POPULATIONS), summary[m]["seeds"]]
                for m in summary]
        out += [f"### {name}", "", f"Overrides: `{' '.join(overrides)}`", "",
                  table(["method", *(f"{p} ndcg@10" for p in POPULATIONS),
                         *(f"{p} ndcg@10 before" for p in POPULATIONS), "seeds"], rows), ""]
        if skipped:
            out += [f"Not in the table: {'; '.join(skipped)}.", ""]
        out += [f"- {v}" for v in verdicts(name, summary)] + [""]
    from bench import q2_dp_curve     # target (d), on what is left of the budget

    left = final - time.time()
    if with_curve:
        out += [q2_dp_curve.run(quick, echo, budget_s=max(left, 0.0), seeds=seeds)
                if left > 0 or quick else "### DP against users per silo (target d)\n\n"
                "Not run: the time budget was spent.\n"]
    if left_out:
        out += [f"Not run in this invocation (`--q2-data` chose {', '.join(parts or [])}): "
                f"{', '.join(left_out)}; their tables and targets are not measured here.", ""]
    return "\n".join([
        "## Q2 Quality against baselines",
        "",
        f"NDCG@10 after adaptation (and, in the `before` columns, of the model as trained, "
        "before the evaluation's fine-tuning), full-catalogue ranking (support items excluded), mean ± std "
        f"over seeds {seeds} (`seeds` says how many finished), user-weighted over domains, "
        "no DP. Every row but the peer's comes from `fedmeta.tools.compare` on the same "
        "data, partitions and evaluation users per seed; `centralised` is the FedAvg model "
        "trained on the training silos pooled per domain; `recbole-sasrec` is RecBole 1.2.1's "
        "SASRec (CE loss) in its own venv on the exported identical split "
        "(`bench/q_recbole.py`). Target (d) (DP at ε = 8 on silos of ≥ 5,000 users) is the "
        "last table (`bench/q2_dp_curve.py`, run on what is left of the budget). Each data "
        "set may spend an equal share of what is left of the budget when it starts (its rows "
        "and its peer run); rows not started within it are listed as not run."
        + (" fedmeta's rows train on the GPU (`runtime.device=cuda`); the RecBole peer's "
           "runner trains on CPU (`use_gpu: False` in `bench/peer/recbole_sasrec.py`): a "
           "quality row, which the device does not change beyond float rounding."
           if on_cuda() else ""),
        "",
        "```", f"fedmeta-bench --only Q2{' --quick' if quick else ''}", "```",
        "",
        "One data set (or the DP curve) at a time: `--q2-data synthetic` (choices: "
        f"{', '.join(PARTS)}); the budget is then shared by the chosen parts only.",
        "",
        *out,
    ])


def _peer_records(rows: list[dict]) -> list[dict]:
    """The peer's per-(seed, population) rows -> compare's per-seed record format."""
    by_seed: dict[int, dict] = {}
    for r in rows:
        rec = by_seed.setdefault(int(r["seed"]), {"method": PEER, "seed": int(r["seed"])})
        rec[f"{r['population']}/ndcg@10"] = float(r["ndcg@10"])
    return list(by_seed.values())
