"""The privacy/utility grid behind ``fedmeta-privacy grid``.

Every setting trains on the same data with the same seed, so the only thing that varies is
the privacy mechanism: user-level DP-SGD inside each client at a target epsilon (``inf`` =
no DP), or client-level central DP at a noise multiplier. Settings run through the public
runner command in a subprocess, as a user would run them: central DP lives in the Flower
server app, which this library must not import.

An epsilon is only reported after it has been recomputed from the client's stored
accountant history and cross-checked with Google's dp_accounting. A disagreement, or a
spend above the target, marks the row and the command fails; the reported value is then
the larger of the candidates, never the smaller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedmeta.config import ConfigError
from fedmeta.privacy.accounting import (UserLevelAccountant, agrees, history_epsilon,
                                        independent_epsilon)
from fedmeta.privacy.planning import central_epsilon

log = logging.getLogger(__name__)

DEFAULT_LOCAL_EPS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
DEFAULT_CENTRAL_NOISE = (0.5, 1.0)
# Chosen so the default grid (8 settings on the default synthetic data) runs in under 20
# minutes on 2 CPU cores (about 14 measured, with two local settings side by side); any of
# them can be overridden on the command line.
DEFAULT_OVERRIDES = ("runtime.rounds=3", "data.max_eval_users=48", "runtime.plots=false")
POPULATIONS = ("warm", "cold", "new-client")
METRICS = ("hr@10", "ndcg@10")
# Keys the grid itself sets per setting; a user override of them would silently change
# what a row means.
RESERVED = {"seed", "privacy", "runtime", "runtime.kind", "hydra.run.dir",
            "privacy.local.enabled", "privacy.local.target_epsilon",
            "privacy.local.noise_multiplier", "privacy.central.enabled",
            "privacy.central.noise_multiplier"}
SIMULATE = "fedmeta-simulate"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class EpsilonCheckError(RuntimeError):
    """A reported epsilon failed its independent re-check."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str                    # local | central | none
    value: float                 # target epsilon (local) or noise multiplier (central)

    def overrides(self) -> list[str]:
        if self.kind == "none":
            return ["runtime=inprocess", "privacy=none"]
        if self.kind == "local":
            return ["runtime=inprocess", "privacy=local",
                    f"privacy.local.target_epsilon={self.value!r}"]
        return ["runtime=simulation", "privacy=central",
                f"privacy.central.noise_multiplier={self.value!r}"]


def settings(local_eps, central_noise) -> list[Setting]:
    out: list[Setting] = []
    for eps in dict.fromkeys(local_eps):
        if math.isinf(eps):
            out.append(Setting("no-dp", "none", math.inf))
        else:
            out.append(Setting(f"local-eps-{eps:g}", "local", float(eps)))
    for sigma in dict.fromkeys(central_noise):
        out.append(Setting(f"central-noise-{sigma:g}", "central", float(sigma)))
    return out


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if override_key(o) in RESERVED:
            raise ConfigError(f"{override_key(o)}: the grid sets this itself for every setting "
                              f"(got override {o!r}); use --local-eps / --central-noise / --seed")


def setting_overrides(setting: Setting, overrides: list[str], seed: int) -> list[str]:
    return [*DEFAULT_OVERRIDES, *overrides, *setting.overrides(), f"seed={seed}"]


# ---- running one setting ----------------------------------------------------------------
def simulate_command() -> str | None:
    """The runner's console script, preferring the one installed next to this interpreter."""
    local = Path(sys.executable).with_name(SIMULATE)
    if local.exists():
        return str(local)
    return shutil.which(SIMULATE)


def runner_available() -> bool:
    """Whether ``fedmeta-simulate`` is installed *and* its module is importable."""
    import importlib.util

    try:
        return simulate_command() is not None and importlib.util.find_spec(
            "server.simulate") is not None
    except ModuleNotFoundError:
        return False


def hydra_value(text: str) -> str:
    """A path as a Hydra override value: quoted unless it is plainly safe."""
    if re.fullmatch(r"[\w./-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_setting(overrides: list[str], out_dir: Path, threads: int | None = None) -> dict:
    """Run one configuration with ``fedmeta-simulate`` and return its summary.json.

    ``threads`` caps the run's intra-op threads (settings running side by side must not
    each spin up one thread per core; on a busy machine that is many times slower).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = simulate_command()
    if command is None or not runner_available():
        raise RuntimeError(f"{SIMULATE} is not installed in this environment "
                           "(pip install -e . from the project checkout)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads))
    argv = [command, *overrides, f"hydra.run.dir={hydra_value(str(out_dir))}"]
    log_path = out_dir / "run.log"
    summary = out_dir / "summary.json"
    summary.unlink(missing_ok=True)        # never read a previous run's result
    log.info("running %s", " ".join(argv))
    with open(log_path, "w") as log_file:
        done = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0 or not summary.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        raise RuntimeError(f"{SIMULATE} failed (exit {done.returncode}) for {out_dir}; "
                           f"log {log_path}, last lines:\n{tail}")
    return json.loads(summary.read_text())


# ---- epsilon checks ---------------------------------------------------------------------
@dataclass
class EpsilonReport:
    epsilon: float = math.nan            # what the table shows: never below any candidate
    independent: float = math.nan
    delta: float = math.nan
    status: str = ""            # ok | ok (computed) | unverified | MISMATCH | no DP
    notes: list[str] = field(default_factory=list)


def client_states(run_dir: Path) -> dict | None:
    """Each simulated node's own ledger (``<run>/nodes/<client>/privacy_ledger.json``): the
    accountant the node itself trusts, read from its disk, not from anything it reported."""
    root = Path(run_dir) / "nodes"
    if not root.is_dir():
        return None
    out = {}
    for path in sorted(root.glob("*/privacy_ledger.json")):
        raw = json.loads(path.read_text())
        out[raw["client_id"]] = {"dp": {"accountant": raw["accountant"]},
                                 "delta": raw["plan"]["delta"]}
    return out


def check_local(summary: dict, run_dir: Path, target: float) -> EpsilonReport:
    """Max user-level epsilon over clients, each recomputed from its accountant history."""
    reported = {c: e for c, e in (summary.get("client_epsilon") or {}).items() if e is not None}
    if not reported:
        raise EpsilonCheckError(f"{run_dir}: local DP was on but summary.json reports no "
                                "client_epsilon")
    states = client_states(run_dir) or {}
    rep = EpsilonReport(epsilon=0.0, independent=0.0, delta=0.0)
    mismatch = unverified = False
    for cid, eps in sorted(reported.items()):
        candidates = [float(eps)]
        acc_state = ((states.get(cid) or {}).get("dp") or {}).get("accountant")
        if acc_state is None:
            unverified = True
            rep.notes.append(f"{cid}: no accountant history stored")
            rep.delta = max(rep.delta, float((states.get(cid) or {}).get("delta", math.nan)))
            rep.epsilon = max(rep.epsilon, *candidates)
            continue
        acc = UserLevelAccountant.from_state_dict(acc_state)
        from fedmeta.privacy.planning import cross_check

        check = cross_check(acc.history, acc.delta, acc.mechanism)
        ours, theirs = history_epsilon(acc.history, acc.delta, acc.mechanism), max(
            0.0, independent_epsilon(acc.history, acc.delta, acc.mechanism))
        candidates += [ours, theirs]              # the table shows the larger, always
        problems = []
        if float(eps) < max(ours, theirs) * (1 - 1e-9):
            problems.append(f"summary says {eps:.6g} but its history gives {max(ours, theirs):.6g}")
        if not check.agrees:
            problems.append(f"opacus {ours:.6g} vs dp_accounting {theirs:.6g}: {check.note}")
        if max(candidates) > target:
            problems.append(f"epsilon {max(candidates):.6g} exceeds the target {target:g}")
        if problems:
            mismatch = True
            rep.notes.append(f"{cid}: " + "; ".join(problems))
        rep.epsilon = max(rep.epsilon, *candidates)
        rep.independent = max(rep.independent, theirs)
        rep.delta = max(rep.delta, acc.delta)   # each client is (max eps, max delta)-DP
    if unverified:
        rep.independent = math.nan
    rep.status = "MISMATCH" if mismatch else "unverified" if unverified else "ok"
    return rep


def check_central(summary: dict) -> EpsilonReport:
    """Client-level epsilon of central DP: the runner's own value, else computed from config.

    The runner draws each round's clients from the (public) seed, so no sampling
    amplification is claimed: one full Gaussian release per round that released an
    aggregate. Counting at the client sampling rate instead would under-report.
    """
    cfg = summary["config"]
    central = cfg["privacy"]["central"]
    sigma, delta = float(central["noise_multiplier"]), float(central["delta"])
    logged = [r["central_dp"] for r in summary.get("rounds") or [] if r.get("central_dp")]
    releases = (sum(1 for r in logged if r.get("released")) if logged
                else int(cfg["runtime"]["rounds"]))
    history = [(sigma, 1.0, releases)] if releases else []
    ours = central_epsilon(sigma, 1.0, releases, delta) if releases else 0.0
    theirs = independent_epsilon(history, delta)
    rep = EpsilonReport(independent=theirs, delta=delta, status="ok")
    candidates = [ours]
    reported = summary.get("central_epsilon")
    if reported is None:
        reported = (summary.get("central_dp") or {}).get("epsilon")
    if reported is None:
        rep.notes.append("central epsilon computed from the config (summary has none)")
        rep.status = "ok (computed)"
    else:
        candidates.append(float(reported))
        if not agrees(float(reported), theirs):
            rep.status = "MISMATCH"
            rep.notes.append(f"runner reports {float(reported):.6g}, dp_accounting "
                             f"{theirs:.6g} (sigma={sigma}, {releases} releases)")
    if not agrees(ours, theirs):
        rep.status = "MISMATCH"
        rep.notes.append(f"opacus {ours:.6g} vs dp_accounting {theirs:.6g}")
        candidates.append(theirs)
    rep.epsilon = max(candidates)
    return rep


# ---- the grid ---------------------------------------------------------------------------
def metric_columns(domains) -> list[str]:
    return [f"{d}/{p}/{m}" for d in domains for p in POPULATIONS for m in METRICS]


def row_for(setting: Setting, summary: dict, run_dir: Path, seconds: float) -> dict:
    row: dict = {"setting": setting.name, "local_epsilon_target": math.nan,
                 "local_epsilon": math.nan, "local_epsilon_independent": math.nan,
                 "central_noise_multiplier": math.nan, "central_epsilon": math.nan,
                 "central_epsilon_independent": math.nan, "delta": math.nan}
    if setting.kind == "local":
        rep = check_local(summary, run_dir, setting.value)
        row.update(local_epsilon_target=setting.value, local_epsilon=rep.epsilon,
                   local_epsilon_independent=rep.independent, delta=rep.delta)
    elif setting.kind == "central":
        rep = check_central(summary)
        row.update(central_noise_multiplier=setting.value, central_epsilon=rep.epsilon,
                   central_epsilon_independent=rep.independent, delta=rep.delta)
    else:
        rep = EpsilonReport(status="no DP")
        if any(e is not None for e in (summary.get("client_epsilon") or {}).values()):
            raise EpsilonCheckError(f"{run_dir}: the no-DP run reports client epsilons")
    for domain, pops in (summary.get("final_metrics") or {}).items():
        for pop in POPULATIONS:
            after = (pops.get(pop) or {}).get("after") or {}
            for metric in METRICS:
                row[f"{domain}/{pop}/{metric}"] = float(after.get(metric, math.nan))
    row["wall_time_s"] = seconds
    row["epsilon_check"] = rep.status
    row["notes"] = " | ".join(rep.notes)
    return row


def run_grid(local_eps, central_noise, overrides: list[str], out: Path, seed: int = 0,
             jobs: int = 1, runner=None, echo=print) -> pd.DataFrame:
    """Run every setting (same data and seed), write privacy_tradeoff.csv/.png, return rows."""
    out = Path(out)
    runner = runner or run_setting
    grid = settings(local_eps, central_noise)
    check_overrides(overrides)
    from fedmeta.runtime.hydra_config import compose

    for s in grid:       # fail on a bad override now, not after an hour of training
        compose([o for o in setting_overrides(s, overrides, seed)])
    # local settings side by side (one thread each); Flower simulations one at a time, as
    # each already spreads its clients over the cores
    by_name: dict[str, dict] = {}
    done = 0

    def one(setting: Setting, threads: int | None) -> tuple[Setting, dict, float]:
        t0 = time.time()
        summary = runner(setting_overrides(setting, overrides, seed), out / setting.name,
                         threads=threads)
        return setting, summary, time.time() - t0

    def record(result) -> None:
        nonlocal done
        setting, summary, seconds = result
        by_name[setting.name] = row_for(setting, summary, out / setting.name, seconds)
        done += 1
        echo(f"[{done}/{len(grid)}] {setting.name}: {seconds:.0f}s, epsilon check "
             f"{by_name[setting.name]['epsilon_check']}")

    local = [s for s in grid if s.kind != "central"]
    if jobs > 1 and len(local) > 1:
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, s, 1) for s in local]
            try:
                for fut in as_completed(futures):
                    record(fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    else:
        for s in local:
            record(one(s, None))
    for s in grid:
        if s.kind == "central":
            record(one(s, None))
    rows = [by_name[s.name] for s in grid]
    domains = sorted({c.split("/")[0] for r in rows for c in r if c.count("/") == 2})
    cols = ["setting", "local_epsilon_target", "local_epsilon", "local_epsilon_independent",
            "central_noise_multiplier", "central_epsilon", "central_epsilon_independent",
            "delta", *metric_columns(domains), "wall_time_s", "epsilon_check", "notes"]
    frame = pd.DataFrame(rows).reindex(columns=cols)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "privacy_tradeoff.csv", index=False)
    plot_tradeoff(frame, domains, out / "privacy_tradeoff.png")
    return frame


def failed_checks(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["epsilon_check"].astype(str).str.startswith("MISMATCH")]


# ---- presentation -----------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table_markdown(frame: pd.DataFrame) -> str:
    domains = sorted({c.split("/")[0] for c in frame.columns if c.count("/") == 2})
    metric_cols = [c for c in metric_columns(domains) if c in frame.columns]
    head = ["setting", "ε target", "ε local (user)", "ε central (client)", "δ",
            *[c.replace("/", " ") for c in metric_cols], "wall s", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [r["setting"], _fmt(r["local_epsilon_target"], 2), _fmt(r["local_epsilon"]),
                 _fmt(r["central_epsilon"]),
                 "" if math.isnan(r["delta"]) else f"{r['delta']:.2g}",
                 *[_fmt(r[c], 4) for c in metric_cols], _fmt(r["wall_time_s"], 0),
                 str(r["epsilon_check"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footnotes(frame: pd.DataFrame) -> list[str]:
    notes = ["Local ε: user-level, max over clients, each recomputed from the client's "
             "accountant history and cross-checked with dp_accounting (which may sit up to "
             "1% above, its fractional RDP orders are conservative); δ is the largest client "
             "δ (1/users by default). Central ε: client-level, cumulative over every released "
             "round, no sampling amplification (clients are drawn from the public seed). "
             "Metrics after adaptation, full-catalogue ranking. wall s: per setting, process "
             "start-up included; local settings may run side by side (--jobs)."]
    computed = frame[frame["epsilon_check"] == "ok (computed)"]
    if len(computed):
        notes.append("Central ε of " + ", ".join(computed["setting"]) + " was computed here "
                     "with planning.central_epsilon from the run's config: the runner's "
                     "summary.json has no central_epsilon.")
    for _, r in frame.iterrows():
        if str(r["epsilon_check"]) in ("unverified",) or str(r["epsilon_check"]).startswith(
                "MISMATCH"):
            notes.append(f"{r['setting']}: {r['epsilon_check']}: {r['notes']}")
    return notes


def plot_tradeoff(frame: pd.DataFrame, domains: list[str], path: Path) -> None:
    """NDCG@10 after adaptation vs epsilon, log x; the no-DP run sits at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = frame[frame["local_epsilon"].notna()].sort_values("local_epsilon")
    central = frame[frame["central_epsilon"].notna()].sort_values("central_epsilon")
    nodp = frame[frame["setting"] == "no-dp"]
    finite = pd.concat([local["local_epsilon"], central["central_epsilon"]])
    finite = finite[finite > 0]
    hi = float(finite.max()) if len(finite) else 1.0
    lo = float(finite.min()) if len(finite) else 1.0
    edge = hi * 4
    fig, axes = plt.subplots(1, max(1, len(domains)), figsize=(5.5 * max(1, len(domains)), 4),
                             squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for pop, colour in (("cold", "tab:blue"), ("warm", "tab:orange")):
            col = f"{domain}/{pop}/ndcg@10"
            if col not in frame:
                continue
            ax.plot(local["local_epsilon"], local[col], "o-", color=colour,
                    label=f"{pop}, local DP (user-level ε)")
            if len(nodp) and len(local):
                ax.plot([local["local_epsilon"].iloc[-1], edge],
                        [local[col].iloc[-1], nodp[col].iloc[0]], ":", color=colour)
            if len(nodp):
                ax.plot([edge], nodp[col], "*", color=colour, markersize=11)
            if len(central):
                ax.plot(central["central_epsilon"], central[col], "s--", color=colour,
                        alpha=0.7, label=f"{pop}, central DP (client-level ε)")
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, edge * 2 if len(nodp) else hi * 2)
        ticks: list[float] = []
        for t in sorted(finite):      # label the epsilons actually measured, not decades
            if not ticks or t > ticks[-1] * 1.25:
                ticks.append(float(t))
        extra = [edge] if len(nodp) else []
        ax.set_xticks([*ticks, *extra], [f"{t:.2g}" for t in ticks] + ["no DP"] * len(extra))
        ax.minorticks_off()
        ax.set_xlabel("ε (log scale)")
        ax.set_ylabel("NDCG@10 after adaptation")
        ax.set_title(domain)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
