"""Q2 target (d): how much of the no-DP quality user-level DP at epsilon = 8 keeps, against
the number of users in a silo.

User-level DP-SGD adds noise of a fixed scale (sigma * C) to the *sum* of the sampled
users' clipped updates, so what matters is how many users a step averages: the relative
noise falls as 1 / (q * n). Here every silo samples the same fraction of its users per step
(``SAMPLE_RATE``; with DP, Poisson sampling at q = users_per_step / declared population),
so a larger silo averages more users per step and, at the same epsilon, needs less noise
relative to its signal. A fixed cohort would show the opposite (no gain from the silo's
size), which is not how DP federated systems are run.

Per silo size and seed: one e-commerce silo of ``n`` synthetic users (the generator at that
size; 20 % of them cold-start users, who never train), the default experiment otherwise
(FOMAML, tiny model, the default rounds and local steps), trained once without DP and once
with the node's local DP at epsilon = 8 (delta 1 / (10 x declared population)); cold users
are scored by full-catalogue NDCG@10 after adaptation. The verdict compares means over
seeds on silos of at least ``TARGET_USERS`` users.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

from bench.common import device_overrides, table

log = logging.getLogger(__name__)

SIZES = (1_000, 5_000, 10_000)
QUICK_SIZES = (200, 400)
SAMPLE_RATE = 0.02        # users per step / silo users, the same on every silo
TARGET_USERS, TARGET_KEPT, EPSILON = 5_000, 0.80, 8.0
ALGORITHM = "fomaml"      # the default experiment's learner
EVAL_USERS = 100


def overrides(n: int, dp: bool, quick: bool = False) -> list[str]:
    """One e-commerce silo of ``n`` users (the social domain is generated at its minimum and
    has no client), ``SAMPLE_RATE * n`` users per step, privacy off or local at epsilon 8."""
    per_step = max(2, round(SAMPLE_RATE * n))
    out = [f"algorithm={ALGORITHM}", f"data.synthetic.ecommerce_users={n}",
           "data.synthetic.social_users=16",
           "data.clients=[{domain:ecommerce,n_clients:1,new_clients:0,scheme:iid}]",
           f"data.max_eval_users={5 if quick else EVAL_USERS}",
           f"algorithm.users_per_step={per_step}", *device_overrides()]
    if quick:
        out += ["runtime.rounds=1", "algorithm.local_steps=1"]
    if dp:
        out += ["privacy=local", f"privacy.local.target_epsilon={EPSILON}"]
    else:
        out += ["privacy=none"]
    return out


def run_cell(n: int, dp: bool, seed: int, quick: bool = False) -> dict:
    """One training run: its cold NDCG@10 and, under DP, the epsilon and delta its node reported."""
    from fedmeta.tools.compare import run_one

    with tempfile.TemporaryDirectory(prefix="bench-q2d-") as tmp:
        rec = run_one(ALGORITHM, seed, overrides(n, dp, quick), Path(tmp))
        summary = json.loads((Path(tmp) / ALGORITHM / f"seed{seed}" / "summary.json").read_text())
    eps = [e for e in (summary.get("client_epsilon") or {}).values() if e is not None]
    delta = [d for d in (summary.get("client_delta") or {}).values() if d is not None]
    return {"users": n, "dp": dp, "seed": seed, "cold": float(rec["cold/ndcg@10"]),
            "seconds": rec["seconds"], "epsilon": max(eps) if eps else None,
            "delta": max(delta) if delta else None}


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, ((sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0)


def curve(records: list[dict]) -> list[dict]:
    """Per silo size: no-DP and DP cold NDCG@10 (mean, sd, seeds), the share DP keeps (ratio
    of means), and the largest epsilon and delta any DP run's node reported."""
    out = []
    for n in sorted({r["users"] for r in records}):
        plain = [r["cold"] for r in records if r["users"] == n and not r["dp"]]
        priv = [r for r in records if r["users"] == n and r["dp"]]
        pm, dm = _mean_sd(plain), _mean_sd([r["cold"] for r in priv])
        eps = [r["epsilon"] for r in priv if r["epsilon"] is not None]
        deltas = [r["delta"] for r in priv if r["delta"] is not None]
        out.append({"users": n, "plain": pm, "plain_seeds": len(plain), "dp": dm,
                    "dp_seeds": len(priv),
                    "kept": dm[0] / pm[0] if pm[0] > 0 and not math.isnan(dm[0]) else float("nan"),
                    "epsilon": max(eps) if eps else float("nan"),
                    "delta": max(deltas) if deltas else float("nan")})
    return out


def verdict(points: list[dict]) -> str:
    big = [p for p in points if p["users"] >= TARGET_USERS and not math.isnan(p["kept"])]
    if not big:
        return (f"(d) DP at epsilon = {EPSILON:g} keeps >= {TARGET_KEPT:.0%} of the no-DP cold "
                f"NDCG@10 on silos of >= {TARGET_USERS:,} users: not measured (no such silo "
                "finished both runs)")
    worst = min(big, key=lambda p: p["kept"])
    ok = worst["kept"] >= TARGET_KEPT
    return (f"(d) DP at epsilon = {EPSILON:g} on silos of >= {TARGET_USERS:,} users keeps "
            + ", ".join(f"{p['kept']:.0%} at {p['users']:,}" for p in big)
            + f" of the no-DP cold NDCG@10 (target >= {TARGET_KEPT:.0%}): "
            + ("**met**" if ok else f"**missed** (by {(TARGET_KEPT - worst['kept']) * 100:.0f} "
                                     "points)"))


def measure(quick: bool, seeds: list[int], budget_s: float, echo=print) -> tuple[list, list]:
    deadline = time.time() + budget_s
    records, skipped = [], []
    for seed in seeds:
        for n in QUICK_SIZES if quick else SIZES:
            for dp in (False, True):
                if time.time() > deadline:
                    skipped.append(f"{n:,} users {'DP' if dp else 'no DP'} seed {seed}")
                    continue
                try:
                    r = run_cell(n, dp, seed, quick)
                except Exception as err:     # reported in the section, the curve goes on
                    log.exception("Q2 (d) %s users dp=%s seed %s failed", n, dp, seed)
                    skipped.append(f"{n:,} users {'DP' if dp else 'no DP'} seed {seed} "
                                   f"(failed: {type(err).__name__}: {err})")
                    continue
                records.append(r)
                echo(f"Q2 (d) {n} users {'DP' if dp else 'no DP'} seed {seed}: cold ndcg@10 "
                     f"{r['cold']:.4f}" + (f" eps {r['epsilon']:.3f}" if r["epsilon"] else "")
                     + f" ({r['seconds']:.0f}s)")
    return records, skipped


def section(records: list[dict], skipped: list[str], seeds: list[int], quick: bool) -> str:
    def fmt(ms):
        return "n/a" if math.isnan(ms[0]) else f"{ms[0]:.4f} ± {ms[1]:.4f}"

    points = curve(records)
    rows = [[p["users"], max(2, round(SAMPLE_RATE * p["users"])), fmt(p["plain"]), p["plain_seeds"],
             fmt(p["dp"]), p["dp_seeds"], "n/a" if math.isnan(p["kept"]) else f"{p['kept']:.0%}",
             p["epsilon"], p["delta"]] for p in points]
    lines = [
        "### DP against users per silo (target d)",
        "",
        f"One e-commerce silo per size, {ALGORITHM}, {SAMPLE_RATE:.0%} of the silo's users per "
        f"step, the default rounds and local steps, no DP against local DP at epsilon = "
        f"{EPSILON:g}; cold NDCG@10 after adaptation, full-catalogue ranking, up to "
        f"{5 if quick else EVAL_USERS} cold users, mean ± std over seeds {seeds}. `kept` = DP mean / no-DP mean; epsilon and "
        "delta are the largest any DP node reported (each is checked against its target by "
        "the node's own ledger). Overrides per cell: "
        f"`{' '.join(overrides(SIZES[0], True, quick))}` (users and users per step scaled).",
        "",
        table(["silo users", "users per step", "no DP cold ndcg@10", "seeds", "DP cold ndcg@10",
               "DP seeds", "kept", "epsilon", "delta"], rows),
        "",
    ]
    if skipped:
        lines += [f"Not run: {'; '.join(skipped)}.", ""]
    lines += [f"- {verdict(points)}", ""]
    return "\n".join(lines)


def run(quick: bool, echo=print, budget_s: float = 3600.0, seeds: list[int] | None = None) -> str:
    seeds = seeds or ([0] if quick else [0, 1, 2])
    records, skipped = measure(quick, seeds, budget_s, echo)
    return section(records, skipped, seeds, quick)


if __name__ == "__main__":        # python -m bench.q2_dp_curve [--quick] [--minutes M]
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--seeds", type=int, nargs="+")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(run(a.quick, budget_s=a.minutes * 60, seeds=a.seeds))
