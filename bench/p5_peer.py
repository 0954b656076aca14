"""P5: the same FedAvg workload in a peer simulator (pfl 0.6) and in fedmeta, side by side.

Same model (fedmeta's recommender and objective, imported by the peer), same users (one
workload file built by fedmeta's data layer from the composed config), same cohort (every
training client each round), same local steps, batch, learning rates and evaluation (fedmeta's
protocol after the last round), central DP with fixed clipping off and on. fedmeta runs
through ``fedmeta-simulate`` (in-process and Flower simulation) with the very overrides the
workload was composed from; the peer runs in its own venv (:mod:`bench.peer.install`).

Runs are interleaved (peer, in-process, simulation, for each privacy setting) so the shared
machine's drift touches every runtime alike; ratios are of median training-round seconds from
runs of this invocation; every simulator evaluates after its last round only. Threads: fedmeta
in-process trains with ``runtime.num_cpus=1`` torch thread, the simulation runs two one-CPU
actors side by side, and the peer runs its cohort sequentially in one process with one torch
thread, as many as the in-process loop.

Device: every simulator runs on the bench device (``--device``). fedmeta gets it as
``runtime.device`` (the simulation also asks Ray for a GPU share per actor); the peer reads the
same ``runtime.device`` from the workload for its batches and evaluation and is started with
``PFL_PYTORCH_DEVICE`` set to it, pfl 0.6's switch for where its model's tensors live.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (REPO, SIMULATE, bench_device, device_overrides, on_cuda,
                          simulate_run, table)
from bench.peer import install
from bench.peer.workload import config_differences

KINDS = ("pfl-1", "inprocess", "simulation")
LABEL = {"pfl-1": "pfl 0.6, 1 thread", "pfl-2": "pfl 0.6, 2 threads",
         "inprocess": "fedmeta in-process", "simulation": "fedmeta Flower simulation"}
NODE_LINE = re.compile(r"node (\S+): (\d+) training users, (\d+) cold users, (\d+) catalogue items")
TARGET_IP, TARGET_SIM = 1.0, 1.5


def overrides(quick: bool, privacy: str) -> list[str]:
    """The workload as Hydra overrides; both simulators are given exactly these."""
    if quick:
        base = ["data=synthetic_small", "runtime.rounds=2", "algorithm.local_steps=1",
                "algorithm.users_per_step=8", "data.max_eval_users=5"]
    else:   # default synthetic data and clients; a budget that fits ~15 min on two cores
        base = ["data=synthetic", "runtime.rounds=3", "algorithm.local_steps=3",
                "algorithm.users_per_step=32", "data.max_eval_users=10"]
    dp = (["privacy=central", "privacy.central.side=server", "privacy.central.clipping=fixed",
           "privacy.central.noise_multiplier=0.5", "privacy.central.clipping_norm=1.0"]
          if privacy == "central" else ["privacy=none"])
    return ["algorithm=fedavg", "model=tiny", *base, *dp, "runtime.fraction_train=1.0",
            "runtime.eval_every=0", "runtime.plots=false", *device_overrides()]


def round_stats(rounds: list[dict]) -> dict:
    """Median training-round seconds (every round but the last, which also evaluates)."""
    secs = [float(r["seconds"]) for r in rounds]
    if not secs:
        raise ValueError("no rounds recorded")
    train = secs[:-1] or secs
    return {"round_s": statistics.median(train), "last_s": secs[-1], "n": len(secs),
            "total_s": sum(secs)}


def parse_peer(stdout: str) -> dict:
    """The runner's one JSON line (the last line starting with '{')."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise ValueError("the peer printed no result line")
    out = json.loads(lines[-1])
    for key in ("rounds", "setup_s", "wall_s", "final_metrics", "config"):
        if key not in out:
            raise ValueError(f"peer result lacks {key!r}")
    return out


def node_sizes(log_text: str) -> dict[str, dict]:
    """Training users and catalogue items per client, from fedmeta's node log lines."""
    return {m[1]: {"train_users": int(m[2]), "cold_users": int(m[3]), "items": int(m[4])}
            for m in NODE_LINE.finditer(log_text)}


def sizes_match(peer: dict, fedmeta: dict) -> bool | None:
    """None when fedmeta logged no sizes (nothing to compare), else whether all agree."""
    if not fedmeta:
        return None
    return all(cid in peer and all(peer[cid][k] == v for k, v in got.items())
               for cid, got in fedmeta.items())


def has_central_dp(summary: dict) -> bool:
    return bool(summary.get("central_dp")) or any(r.get("central_dp")
                                                   for r in summary.get("rounds", []))


def mean_ndcg(final: dict, stage: str = "after") -> float:
    """Mean NDCG@10 over the domain x population cells (the summary's final metrics)."""
    vals = [pops[p][stage]["ndcg@10"] for pops in final.values() for p in pops
            if stage in pops[p] and "ndcg@10" in pops[p][stage]]
    return statistics.fmean(vals) if vals else float("nan")


def _tail(proc) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    errs = [ln for ln in lines if "Error" in ln or "error" in ln] or lines[-1:] or ["no output"]
    return errs[-1][:300]


def run_fedmeta(kind: str, ovr: list[str], timeout: float) -> dict:
    run = simulate_run(kind, ovr, timeout, "bench-p5")
    proc, summary = run["proc"], run["summary"]
    if proc.returncode != 0 or summary is None:
        return {"error": f"exit {proc.returncode}: {_tail(proc)}", "cmd": run["cmd"]}
    return {"rounds": summary["rounds"], "wall_s": run["wall"],
            "final_metrics": summary["final_metrics"], "config": summary.get("config", {}),
            "central_dp": has_central_dp(summary), "sizes": node_sizes(run["logs"]),
            "cmd": run["cmd"]}


def peer_env(threads: int) -> dict[str, str]:
    """The peer's environment: the repo on its path, its threads, and pfl's device switch
    set to the bench device (pfl otherwise prefers any GPU it sees, whatever fedmeta uses)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads),
            "PFL_PYTORCH_DEVICE": bench_device()}


def run_peer(workload: Path, threads: int, timeout: float) -> dict:
    cmd = [str(install.python()), "-m", "bench.peer.pfl_fedavg", str(workload), str(threads)]
    env = peer_env(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {_tail(proc)}"}
    out = parse_peer(proc.stdout)
    out["wall_s"] = wall    # the process's whole life, as for fedmeta-simulate
    out["central_dp"] = out.get("central_dp") is not None
    return out


def top_functions(prof: Path, n: int = 6) -> dict:
    """The ``n`` functions with the most own time in a cProfile dump, with the profiled
    total (the sum of every function's own time) to give each its share."""
    import pstats

    st = pstats.Stats(str(prof)).stats
    total = sum(v[2] for v in st.values())
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:n]
    return {"total_s": total,
            "top": [[f"{Path(f).name}:{line}({name})", v[2]] for (f, line, name), v in top]}


def profile_runs(ovr: list[str], workload: Path, timeout: float) -> dict:
    """One more run of fedmeta in-process and of the peer (1 thread), each under cProfile:
    where the time goes, measured, for the section's text."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-p5-prof-") as tmp:
        cmds = {"inprocess": [sys.executable, "-m", "cProfile", "-o", f"{tmp}/ip.prof", SIMULATE,
                              "runtime=inprocess", *ovr, f"hydra.run.dir={tmp}/run"],
                "pfl-1": [str(install.python()), "-m", "cProfile", "-o", f"{tmp}/pfl-1.prof",
                          "-m", "bench.peer.pfl_fedavg", str(workload), "1"]}
        for kind, cmd in cmds.items():
            env = (peer_env(1) if kind == "pfl-1"
                   else {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=REPO, env=env)
            prof = Path(cmd[cmd.index("-o") + 1])
            out[kind] = (top_functions(prof) if proc.returncode == 0 and prof.exists()
                         else {"error": f"exit {proc.returncode}: {_tail(proc)}"})
    return out


def measure(quick: bool, echo, repeats: int = 1) -> dict:
    from bench.peer.workload import export

    setup = install.ensure(echo=echo)
    found: dict[str, dict[str, list[dict]]] = {}
    workdir = install.VENV.parent / "p5"
    for privacy in ("none", "central"):
        ovr = overrides(quick, privacy)
        workload = workdir / f"workload-{privacy}.pkl"
        sizes = export(["runtime=inprocess", *ovr], workload)
        runs = found.setdefault(privacy, {k: [] for k in KINDS})
        for rep in range(repeats):
            for kind in KINDS:
                res = (run_peer(workload, int(kind[-1]), timeout=1800) if kind.startswith("pfl")
                       else run_fedmeta(kind, ovr, timeout=1800))
                res["export_sizes"] = sizes
                runs[kind].append(res)
                what = res.get("error") or f"wall {res['wall_s']:.1f}s"
                echo(f"P5 {privacy} {kind} repeat {rep}: {what}")
    profile = profile_runs(overrides(quick, "none"), workdir / "workload-none.pkl", 1800)
    echo("P5 profiled: " + ", ".join(f"{k} {v.get('total_s', 0):.0f}s" for k, v in profile.items()))
    return {"setup": setup, "runs": found, "quick": quick, "profile": profile}


def _verdict(ratio: float | None, target: float, what: str) -> str:
    if ratio is None:
        return f"{what}: **not measured**"
    met = ratio <= target
    miss = "" if met else f", {ratio / target - 1:+.0%} over"
    return f"{what}: **{'met' if met else 'missed'}** (x{ratio:.2f}, target <= {target:g}{miss})"


def summarise(found: dict) -> dict:
    """Per privacy mode: medians per kind, ratios and verdicts (None where a run failed)."""
    out = {}
    for privacy, runs in found["runs"].items():
        med, notes = {}, []
        for kind, reps in runs.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                notes.append(f"{LABEL[kind]}: failed: {reps[0]['error']}")
                continue
            if privacy == "central" and not all(r["central_dp"] for r in ok):
                notes.append(f"{LABEL[kind]}: ran *without* central DP although the config "
                             "enables it (the runtime does not implement it yet); left out")
                continue
            stats = [round_stats(r["rounds"]) for r in ok]
            med[kind] = {"round_s": statistics.median(s["round_s"] for s in stats),
                         "last_s": statistics.median(s["last_s"] for s in stats),
                         "rounds": stats[0]["n"],
                         "wall_s": statistics.median(r["wall_s"] for r in ok),
                         "ndcg": mean_ndcg(ok[0]["final_metrics"]), "cmd": ok[0].get("cmd")}
        pfl = [med[k]["round_s"] for k in ("pfl-1", "pfl-2") if k in med]
        ip = (med["inprocess"]["round_s"] / med["pfl-1"]["round_s"]
              if "inprocess" in med and "pfl-1" in med else None)
        sim = med["simulation"]["round_s"] / min(pfl) if "simulation" in med and pfl else None
        out[privacy] = {"med": med, "notes": notes, "ip_ratio": ip, "sim_ratio": sim,
                        "checks": workload_checks(runs)}
    return out


def workload_checks(runs: dict) -> dict:
    """Does the peer train what fedmeta trains? Sizes against fedmeta's node logs, and the
    workload-defining config sections against fedmeta's summary.json."""
    peer = next((r for k in ("pfl-1", "pfl-2") for r in runs.get(k, []) if "error" not in r), None)
    ours = [r for k in ("inprocess", "simulation") for r in runs.get(k, []) if "error" not in r]
    if peer is None or not ours:
        return {}
    logged = next((r["sizes"] for r in ours if r.get("sizes")), {})
    differ = sorted({k for r in ours for k in config_differences(peer["config"], r["config"])})
    return {"sizes": sizes_match(peer["sizes"], logged), "clients": len(logged),
            "config_differs": differ, "cohort": peer.get("cohort"), "params": peer.get("params"),
            "versions": peer.get("versions", {})}


def render(found: dict, s: dict) -> str:
    setup = found["setup"]
    text = ["## P5 Side by side with pfl 0.6", "", __doc__.split("\n\n")[1].replace("\n", " "),
            "", __doc__.split("\n\n")[2].replace("\n", " "), "",
            *([__doc__.split("\n\n")[3].replace("\n", " "), ""] if on_cuda() else []),
            "The peer's venv (made by this command when missing, reused otherwise; this "
            f"invocation {'installed it' if setup['installed'] else 'reused it'}):", "", "```",
            *setup["commands"], "```", "", "fedmeta's runs (privacy off; on: the `privacy=...` "
            "overrides differ, the in-process runs say `runtime=inprocess`):", ""]
    for privacy in ("none", "central"):
        cmd = next((m["cmd"] for m in s[privacy]["med"].values() if m.get("cmd")), None)
        if cmd:
            text += ["```", cmd.replace(SIMULATE, "fedmeta-simulate"), "```"]
    text += ["(the peer: `.bench/pfl-venv/bin/python -m bench.peer.pfl_fedavg WORKLOAD THREADS`, "
             "WORKLOAD composed from the same overrides)", ""]
    rows, figures = [], []
    for privacy, label in (("none", "off"), ("central", "central, sigma 0.5, C 1")):
        for kind, m in s[privacy]["med"].items():
            rows.append([label, LABEL[kind], m["rounds"], m["round_s"], m["last_s"], m["wall_s"],
                         m["ndcg"]])
        for key, what in (("ip_ratio", "in-process / pfl (1 thread)"),
                          ("sim_ratio", "simulation / pfl")):
            if s[privacy][key] is not None:
                figures.append([f"DP {label}: {what}, training round", s[privacy][key]])
    text += [table(["DP", "simulator", "rounds", "train round s (median)", "last round s (with "
                    "eval)", "wall s", "NDCG@10 after (mean of cells)"], rows), "",
             table(["figure", "value"], figures), ""]
    for privacy, label in (("none", "DP off"), ("central", "central DP")):
        c = s[privacy]["checks"]
        if not c:
            continue
        same = {None: "not logged by fedmeta, not checked",
                True: f"yes, all {c['clients']} clients", False: "**NO**"}[c["sizes"]]
        text += [f"- Workload check, {label}: cohort {c['cohort']} clients, {c['params']} trained "
                 f"parameters; per-client training users, cold users and catalogue items equal to "
                 f"fedmeta's nodes: {same}; config "
                 + ("identical" if not c["config_differs"] else
                    f"**differs** at {c['config_differs']}") + " (seed, data, model, algorithm, "
                 "privacy, runtime rounds/fraction_train/eval_every: fedmeta's summary.json vs "
                 "the peer's workload)."]
    versions = next((s[p]["checks"].get("versions") for p in s if s[p]["checks"]), {})
    if versions:
        text += [f"- Peer venv: pfl {versions.get('pfl')}, torch {versions.get('torch')}.", ""]
    for privacy, label in (("none", "DP off"), ("central", "central DP")):
        text += [f"**Target** {label}: "
                 + _verdict(s[privacy]["ip_ratio"], TARGET_IP, "in-process at least as fast as pfl")
                 + "; " + _verdict(s[privacy]["sim_ratio"], TARGET_SIM,
                                   "Flower simulation within 1.5x of pfl") + "."]
        text += [f"- {n}" for n in s[privacy]["notes"]]
    text += profile_text(found.get("profile", {}))
    return "\n".join(text)


def profile_text(profile: dict) -> list[str]:
    """Where the time goes: the functions with the most own time, per simulator, DP off."""
    if not profile:
        return []
    rows = []
    for kind, p in profile.items():
        if "error" in p:
            rows.append([LABEL[kind], f"profile failed: {p['error']}", "", ""])
            continue
        rows += [[LABEL[kind], f"`{f}`", t, f"{t / p['total_s']:.0%}"] for f, t in p["top"]]
    return ["", "Where the time goes, DP off: one more run of each, under cProfile (whole "
            "process: start-up, every round and the evaluation; the functions with the most own "
            "time, and their share of the profiled total):", "",
            table(["simulator", "function", "own s", "share"], rows)]


def run(quick: bool, echo=print) -> str:
    try:
        found = measure(quick, echo)
    except install.PeerUnavailable as err:
        return f"## P5 Side by side with pfl 0.6\n\nThe peer could not be installed here: {err}"
    raw = install.VENV.parent / "p5" / "runs.json"     # every round of every run, for audit
    raw.write_text(json.dumps(found, indent=1, default=float))
    return render(found, summarise(found))
