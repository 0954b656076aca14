"""Run outputs: ``metrics.csv`` (long format), ``summary.json``, ``plots/*.png``.

Per-client metric rows are kept as measured; domain-level figures are user-weighted means
over clients (each client row carries how many users it evaluated), so a client with three
users does not count as much as one with three hundred.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedmeta.config import to_dict

log = logging.getLogger(__name__)

COLUMNS = ["round", "phase", "population", "stage", "domain", "client", "metric", "value"]
HEADLINE = ("ndcg@10", "hr@10")


@dataclass
class Recorder:
    rows: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def train_rows(self, server_round: int, client: str, domain: str, metrics: dict) -> None:
        for metric, value in metrics.items():
            self.rows.append({"round": server_round, "phase": "train", "population": "warm",
                              "stage": "", "domain": domain, "client": client,
                              "metric": metric, "value": float(value)})

    def eval_rows(self, rows: list[dict]) -> None:
        for r in rows:
            self.rows.append({"phase": "eval", **r})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)


def domain_table(frame: pd.DataFrame, server_round: int | None = None) -> pd.DataFrame:
    """User-weighted mean per (domain, population, stage, metric) of one round's eval rows."""
    ev = frame[frame["phase"] == "eval"]
    if ev.empty:
        return pd.DataFrame(columns=["domain", "population", "stage", "metric", "value", "users"])
    ev = ev[ev["round"] == (ev["round"].max() if server_round is None else server_round)]
    users = ev[ev["metric"] == "users"].set_index(["client", "population", "stage"])["value"]
    ev = ev[ev["metric"] != "users"].copy()
    ev["users"] = [users.get((c, p, s), 0.0) for c, p, s in
                   zip(ev["client"], ev["population"], ev["stage"])]
    ev["weighted"] = ev["value"] * ev["users"]
    g = ev.groupby(["domain", "population", "stage", "metric"], as_index=False)[["weighted", "users"]].sum()
    g["value"] = g["weighted"] / g["users"].where(g["users"] > 0)
    return g.drop(columns="weighted")


def progress_line(server_round: int, rounds: int, seconds: float, frame: pd.DataFrame,
                  accepted: int, failures: int, elapsed: float | None = None) -> str:
    tr = frame[(frame["phase"] == "train") & (frame["round"] == server_round)]
    loss = tr.loc[tr["metric"] == "train_query_loss", "value"].mean()
    parts = [f"round {server_round}/{rounds}", f"{seconds:.1f}s"]
    if elapsed is not None:
        eta = elapsed / server_round * (rounds - server_round) if server_round else 0.0
        parts.append(f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
    parts += [f"clients ok {accepted}", f"failed {failures}"]
    if loss == loss:          # not NaN: DP nodes do not report their training loss
        parts.append(f"query-loss {loss:.4f}")
    eps = tr.loc[tr["metric"] == "epsilon", "value"]
    if len(eps):
        delta = tr.loc[tr["metric"] == "delta", "value"]
        parts.append(f"max-eps {eps.max():.3f}"
                     + (f" (delta {delta.max():.2g})" if len(delta) else ""))
    table = domain_table(frame, server_round) if (frame["phase"] == "eval").any() else None
    if table is not None and not table.empty and (table.get("stage") == "after").any():
        cold = table[(table["stage"] == "after") & (table["metric"] == "ndcg@10")]
        for _, r in cold.iterrows():
            parts.append(f"{r['domain']}/{r['population']} ndcg@10 {r['value']:.4f}")
    return " | ".join(parts)


def write_outputs(out_dir: Path, cfg, recorder: Recorder, client_privacy: dict[str, dict],
                  extra: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = recorder.frame()
    frame.to_csv(out_dir / "metrics.csv", index=False)
    table = domain_table(frame)
    final = {}
    for _, r in table.iterrows():
        final.setdefault(r["domain"], {}).setdefault(r["population"], {}).setdefault(
            r["stage"], {})[r["metric"]] = r["value"]
    summary = {
        "config": to_dict(cfg),
        "final_metrics": final,
        "wall_time_s": time.time() - recorder.started,
        "rounds": recorder.rounds,
        "failures_total": sum(len(r.get("failures", {})) for r in recorder.rounds),
        # as each node last reported it; its own ledger is the authority
        "client_epsilon": {c: p.get("epsilon") for c, p in sorted(client_privacy.items())},
        "client_delta": {c: p.get("delta") for c, p in sorted(client_privacy.items())},
        "private_against_server": {c: bool(p.get("private_against_server", 1.0))
                                   for c, p in sorted(client_privacy.items())},
        **(extra or {}),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    if cfg.runtime.plots:
        plot(frame, out_dir / "plots")
    return summary


def plot(frame: pd.DataFrame, directory: Path) -> None:
    """Metrics vs round per domain, and before vs after adaptation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    ev = frame[frame["phase"] == "eval"]
    rounds = sorted(ev["round"].unique())
    for metric in HEADLINE:
        tables = [domain_table(frame, r).assign(round=r) for r in rounds]
        if not tables:
            continue
        t = pd.concat(tables)
        t = t[(t["metric"] == metric) & (t["stage"] == "after")]
        fig, ax = plt.subplots(figsize=(6, 4))
        for (dom, pop), g in t.groupby(["domain", "population"]):
            ax.plot(g["round"], g["value"], marker="o", label=f"{dom} / {pop}")
        ax.set_xlabel("round"), ax.set_ylabel(f"{metric} after adaptation"), ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(directory / f"{metric.replace('@', '_at_')}_vs_round.png")
        plt.close(fig)
    last = ev[(ev["round"] == ev["round"].max()) & (ev["metric"] == "ndcg@10")] if len(ev) else ev
    if not last.empty:
        # mean and spread over the clients of each domain/population (error bars: one std)
        g = last.groupby(["domain", "population", "stage"])["value"].agg(["mean", "std"]).fillna(0.0)
        mean = g["mean"].unstack("stage")
        std = g["std"].unstack("stage")
        fig, ax = plt.subplots(figsize=(7, 4))
        mean.plot.bar(ax=ax, yerr=std, capsize=3, rot=20)
        ax.set_ylabel("NDCG@10 (mean over clients, bars: 1 std)")
        ax.set_xlabel("")
        ax.set_title("before vs after adaptation")
        fig.tight_layout(), fig.savefig(directory / "before_after_adaptation.png")
        plt.close(fig)
    tr = frame[(frame["phase"] == "train") & (frame["metric"] == "train_query_loss")]
    if not tr.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for dom, g in tr.groupby("domain"):
            s = g.groupby("round")["value"].mean()
            ax.plot(s.index, s.values, marker="o", label=dom)
        ax.set_xlabel("round"), ax.set_ylabel("training query loss"), ax.legend()
        fig.tight_layout(), fig.savefig(directory / "train_loss_vs_round.png")
        plt.close(fig)


def summary_table(summary: dict, out_dir: Path) -> str:
    """The end-of-run console summary: per domain and population NDCG@10 / HR@10 before ->
    after adaptation, epsilon and delta per client, wall time and where the outputs are."""
    lines = ["", "| domain | population | ndcg@10 before -> after | hr@10 before -> after |",
             "|---|---|---|---|"]
    for dom, pops in sorted(summary.get("final_metrics", {}).items()):
        for pop, stages in sorted(pops.items()):
            b, a = stages.get("before", {}), stages.get("after", {})
            cell = [f"{b.get(m, float('nan')):.4f} -> {a.get(m, float('nan')):.4f}"
                    for m in HEADLINE]
            lines.append(f"| {dom} | {pop} | {cell[0]} | {cell[1]} |")
    eps, delta = summary.get("client_epsilon", {}), summary.get("client_delta", {})
    if eps:
        lines.append("")
        lines.append("user-level DP per client: " + ", ".join(
            f"{c} eps {e:.3f} (delta {delta.get(c, float('nan')):.2g})" for c, e in eps.items()
            if e is not None))
        if not all(summary.get("private_against_server", {}).values()):
            lines.append("NOT private against the server: a reproducibility secret seeded the noise")
    central = summary.get("central_dp")
    if central:
        lines.append(f"client-level central DP: eps {central['epsilon']:.3f} "
                     f"(delta {central['delta']:.2g}, no sampling amplification)")
    lines.append(f"wall time {summary.get('wall_time_s', 0):.0f} s; outputs: "
                 f"{out_dir / 'metrics.csv'}, {out_dir / 'summary.json'}, {out_dir / 'plots'}, "
                 f"{out_dir / 'checkpoint'}")
    return "\n".join(lines)
