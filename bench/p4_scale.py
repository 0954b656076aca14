"""P4: one node's client-round against the size of its silo, at a fixed number of sampled users.

A DP step samples each user with probability q = users_per_step / (declared population),
so about q*n users; with ``algorithm.users_per_step`` held fixed (the batch without DP) the
work of a step is about the same on every silo, and a round's cost should not grow with the
silo's size n. Anything that does is O(n) per step (or per round) and shows in the profile.

Per silo size, two fresh processes (``bench.cell``): ``silo_build`` generates the synthetic
sources at that size, cuts the one silo and writes it (the data build, once); ``silo_round``
is the node: it reads the silo, builds its tasks once, then for FedAvg, Reptile and FOMAML,
without and with local DP, builds its node and runs a timed round and a profiled round
(cProfile). The one-off costs (generation, tasks, budget) are reported
apart from the per-round ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bench.common import on_cuda, run_cell, table

SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (200, 400)
ALGORITHMS = ("fedavg", "reptile", "fomaml")
USERS_PER_STEP = 32       # q * n: the expected sampled users per step, fixed across n
LOCAL_STEPS = 2
GROWTH = 1.3              # a per-round cost this much higher on the largest silo "grows"
TIMEOUT = {"build": 1200.0, "round": 2400.0, "iid100": 1800.0, "user1000": 5400.0}


def overrides(users: int, quick: bool = False) -> list[str]:
    """One e-commerce silo of ``users`` users (cold users included; the social domain is
    generated at its minimum and not used), 2 local steps of 32 users, 2 rounds planned."""
    return [f"data.synthetic.ecommerce_users={users}", "data.synthetic.social_users=16",
            "data.clients=[{domain:ecommerce,n_clients:1,new_clients:0,scheme:iid}]",
            "data.max_eval_users=1", f"algorithm.local_steps={1 if quick else LOCAL_STEPS}",
            f"algorithm.users_per_step={USERS_PER_STEP}", "runtime.rounds=2"]


def combos() -> list[list]:
    return [[a, dp] for a in ALGORITHMS for dp in (False, True)]


def federation_overrides(kind: str, quick: bool = False) -> list[str]:
    """The default federation (synthetic data, FOMAML, tiny model) scaled to many clients, in
    the in-process runtime: ``iid100`` = 50 IID clients per domain on the default 800 users
    per domain (16 each); ``user1000`` = cross-device, one user per client (scheme ``user``)
    on 625 users per domain, of which the 20 % cold-start share become new clients, leaving
    1,000 training clients. No DP (a one-user client has no user-level DP to speak of), one
    local step of up to 8 users, 2 rounds, evaluation in the last (one user per population)."""
    users, clients = {"iid100": (800, "scheme:iid,n_clients:50,new_clients:1"),
                      "user1000": (625, "scheme:user,n_clients:1,new_clients:0")}[kind]
    if quick:
        users = 40 if kind == "user1000" else 160
    spec = ",".join(f"{{domain:{d},{clients}}}" for d in ("ecommerce", "social"))
    return [f"data.synthetic.ecommerce_users={users}", f"data.synthetic.social_users={users}",
            f"data.clients=[{spec}]", "privacy=none", "algorithm.local_steps=1",
            "algorithm.users_per_step=8", "data.max_eval_users=1", "runtime.rounds=2",
            "runtime.eval_every=0"]


FEDERATIONS = ("iid100", "user1000")


def measure(quick: bool, echo=print) -> dict:
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="fedmeta-p4-") as tmp:
        for n in QUICK_SIZES if quick else SIZES:
            out = Path(tmp) / f"silos-{n}"
            ovr = overrides(n, quick)
            build = run_cell("silo_build", {"overrides": ovr, "out": str(out)}, TIMEOUT["build"])
            res[n] = {"build": build}
            if "error" in build:
                echo(f"P4 {n} users: build {build['error']}")
                continue
            node = run_cell("silo_round", {"overrides": ovr, "combos": combos(),
                                           "silo_dir": str(out / build["client"])},
                            TIMEOUT["round"])
            res[n]["node"] = node
            echo(f"P4 {n} users: build {build['generate_s'] + build['cut_s']:.0f}s, "
                 + (node["error"] if "error" in node else
                    f"tasks {node['tasks_s']:.0f}s, rounds " + " ".join(
                        f"{c['round_s'][0]:.1f}" for c in node["combos"])))
    feds = {}
    for kind in FEDERATIONS:
        with tempfile.TemporaryDirectory(prefix="fedmeta-p4-fed-") as tmp:
            partial = Path(tmp) / "partial.json"
            r = run_cell("federation", {"overrides": federation_overrides(kind, quick),
                                        "partial": str(partial)}, TIMEOUT[kind])
            if "error" in r and partial.is_file():     # keep what finished before the timeout
                r = {**json.loads(partial.read_text()), "error": r["error"]}
        feds[kind] = r
        echo(f"P4 federation {kind}: " + (r["error"] if "clients" not in r else
             f"{r['clients']} clients, build {r['build_s']:.0f}s, rounds "
             + " ".join(f"{t:.0f}s" for t in r["round_s"]) + f", peak {r['peak_rss_mb']:.0f} MB")
             + (f" ({r['error']})" if "clients" in r and "error" in r else ""))
    echo("P4 raw: " + json.dumps({"silos": res, "federations": feds}))
    return {"silos": res, "federations": feds}


# ---- report ----------------------------------------------------------------------------------
def _label(dp: bool) -> str:
    return "local" if dp else "none"


def data_rows(res: dict) -> list[list]:
    rows = []
    for n, r in sorted(res.items()):
        b, node = r["build"], r.get("node", {"error": "not run"})
        if "error" in b:
            rows.append([n, f"failed: {b['error']}"] + [""] * 9)
            continue
        tail = ([f"failed: {node['error']}", "", "", ""] if "error" in node else
                [node["read_s"], node["tasks_s"], node["peak_load_mb"], node["rss_loaded_mb"]])
        rows.append([n, b["users"], b["train_users"], b["interactions"], b["generate_s"],
                     b["cut_s"] + b["write_s"], b["peak_rss_mb"], *tail])
    return rows


def combo_index(res: dict) -> dict[tuple[str, bool], dict[int, dict]]:
    """(algorithm, dp) -> silo size -> that combination's cell result."""
    out: dict = {}
    for n, r in sorted(res.items()):
        for c in r.get("node", {}).get("combos", []):
            out.setdefault((c["algorithm"], bool(c["dp"])), {})[n] = c
    return out


def _cpu(c: dict) -> float:
    """The timed round's CPU seconds (wall seconds from results that predate CPU timing)."""
    return c.get("round_cpu_s", c["round_s"])[0]


def _work(c: dict, cuda: bool) -> float:
    """The round's cost the verdicts compare: CPU time on CPU (one thread, not stretched by
    other processes), wall time on CUDA (the GPU's work is not this process's CPU time)."""
    return c["round_s"][0] if cuda else _cpu(c)


def _gpu(c: dict):
    return c["round_gpu_peak_mb"] if c.get("round_gpu_peak_mb") is not None else "-"


def round_rows(res: dict, cuda: bool = False) -> list[list]:
    """One row per (silo size, algorithm, privacy); on CUDA a last column adds the round's
    ``max_memory_allocated``."""
    rows = []
    for (algo, dp), by_n in combo_index(res).items():
        for n, c in sorted(by_n.items()):
            t, users = c["round_s"][0], c["sampled"][0]
            cpu = _cpu(c)
            rows.append([n, algo, _label(dp), c.get("population") if dp else "-", users, t, cpu,
                         users / t if t > 0 else float("nan"),
                         cpu / max(users, 1) * 1000, c["round_peak_mb"],
                         c["budget_s"] if dp else 0.0,
                         c["node_s"]] + ([_gpu(c)] if cuda else []))
    return rows


def growth(res: dict, cuda: bool = False) -> list[tuple[str, bool, int, int, float]]:
    """(algorithm, dp, n0, n1, ratio of CPU ms per sampled user, largest / smallest silo);
    wall ms on CUDA (:func:`_work`)."""
    out = []
    for (algo, dp), by_n in combo_index(res).items():
        if len(by_n) < 2:
            continue
        n0, n1 = min(by_n), max(by_n)
        per = [_work(by_n[n], cuda) / max(by_n[n]["sampled"][0], 1) for n in (n0, n1)]
        out.append((algo, dp, n0, n1, per[1] / per[0]))
    return out


def grown_functions(res: dict, algo: str, dp: bool, top: int = 5, floor_s: float = 0.005
                    ) -> list[tuple[str, float, float]]:
    """Functions of the profiled round whose own time grew most from the smallest to the
    largest silo: (function, seconds on the smallest, seconds on the largest)."""
    by_n = combo_index(res).get((algo, dp), {})
    if len(by_n) < 2:
        return []
    small, large = by_n[min(by_n)]["profile"], by_n[max(by_n)]["profile"]
    rows = [(f, small.get(f, 0.0), t) for f, t in large.items() if t >= floor_s]
    rows.sort(key=lambda r: -(r[2] - r[1]))
    return rows[:top]


def profile_rows(res: dict, top: int = 3) -> list[list]:
    """Per combination, the profiled round's functions whose own time grew most with n."""
    rows = []
    for (algo, dp), by_n in combo_index(res).items():
        if len(by_n) < 2:
            continue
        for f, a, b in grown_functions(res, algo, dp, top=top):
            rows.append([algo, _label(dp), f"`{f}`", a, b])
    return rows


def one_off_text(res: dict) -> str:
    """How the one-off costs grow with the silo: generation and the node's task build."""
    done = [(n, r) for n, r in sorted(res.items()) if "error" not in r.get("node", {"error": 1})]
    if len(done) < 2:
        return ""
    (n0, r0), (n1, r1) = done[0], done[-1]
    t0, t1 = r0["node"]["tasks_s"], r1["node"]["tasks_s"]
    return (f"One-off, per node start: building the node's tasks took {t0:.1f} s at {n0:,} users "
            f"and {t1:.0f} s at {n1:,} (x{t1 / t0:.0f} for x{n1 / n0:.0f} the users): linear in "
            f"the silo, paid when the node starts; under local DP twice more before it (the "
            f"launcher builds every silo's tasks to declare its population, `init_budget` "
            f"builds them again for the budget). The node's RSS after "
            f"loading went {r0['node']['rss_loaded_mb']:.0f} -> "
            f"{r1['node']['rss_loaded_mb']:.0f} MB; the data build's peak "
            f"{r0['build']['peak_rss_mb']:.0f} -> {r1['build']['peak_rss_mb']:.0f} MB.")


def verdicts(res: dict, cuda: bool = False) -> list[str]:
    out = []
    for algo, dp, n0, n1, ratio in growth(res, cuda):
        grew = ratio > GROWTH
        what = "wall time" if cuda else "CPU time"
        line = (f"{algo}, privacy={_label(dp)}: {what} per sampled user x{ratio:.2f} from "
                f"{n0:,} to {n1:,} users -> 'cost grows with sampled users, not silo size' "
                f"**{'missed' if grew else 'met'}**")
        if grew:
            fns = grown_functions(res, algo, dp, top=3)
            line += " (grew most: " + "; ".join(f"`{f}` {a:.3f} -> {b:.3f} s"
                                                for f, a, b in fns) + ")"
        out.append(line + ".")
    return out


def federation_rows(feds: dict, cuda: bool = False) -> list[list]:
    rows = []
    for kind, r in feds.items():
        if "clients" not in r:
            rows.append([kind, f"failed: {r['error']}"] + [""] * (9 + cuda))
            continue
        rounds, cpu = r["round_s"], r.get("round_cpu_s", [])
        missing = f"not reached: {r['error']}" if "error" in r else "-"
        rows.append([kind, r["clients"], r["training_clients"], r["users_per_client"],
                     r["build_s"], r["build_s"] / r["clients"] * 1000,
                     rounds[0] if rounds else missing, cpu[0] if cpu else missing,
                     rounds[1] if len(rounds) > 1 else missing,
                     r["rss_built_mb"], r["peak_rss_mb"]]
                    + ([r["peak_gpu_mb"] if r.get("peak_gpu_mb") is not None else "-"]
                       if cuda else []))
    return rows


def run(quick: bool, echo=print) -> str:
    both = measure(quick, echo)
    res, feds = both["silos"], both["federations"]
    sizes = sorted(res)
    cuda = on_cuda()
    lines = [
        "## P4 Silo scale",
        "",
        f"One e-commerce silo of {', '.join(f'{n:,}' for n in sizes)} synthetic users (the "
        "generator at that size; 20 % of them cold-start users, who do not train), one node on "
        f"it: {LOCAL_STEPS if not quick else 1} local steps of {USERS_PER_STEP} sampled users "
        "(`algorithm.users_per_step`, the same on every silo; a DP step samples each user with "
        f"q = {USERS_PER_STEP}/population, the population the engine declares for the node: the "
        "1-2-5 value at or above its training users, so about 25 users a step here), tiny "
        "model, one thread, no evaluation"
        + (", nodes on the GPU (timers synchronise it; verdicts use wall time, since the "
           "GPU's work is not the process's CPU time; 'round GPU peak MB' is "
           "torch.cuda.max_memory_allocated over the rounds)" if cuda else "") + ". Data build "
        "and node processes are fresh per silo size; round figures are the node's first round "
        "(a second, profiled round follows), in wall and in CPU time: with one thread, CPU "
        "time is the round's own work, which the other processes on a loaded machine do not "
        "stretch, so the verdicts use it; peak RSS is the rise of VmHWM over the RSS "
        "before the rounds (VmHWM reset), the node's own peak while loading is in the first table.",
        "",
        "```", "fedmeta-bench --only P4", "```",
        "",
        "One-off data costs (not per round):",
        "",
        table(["silo users", "users", "training users", "interactions", "generate s",
               "cut + write s", "build peak RSS MB", "node: read silo s", "node: build tasks s",
               "node: peak RSS loading MB", "node: RSS loaded MB"], data_rows(res)),
        "",
        one_off_text(res),
        "",
        "Per round:",
        "",
        table(["silo users", "algorithm", "privacy", "declared population", "sampled users",
               "round s", "round CPU s", "users/s",
               "CPU ms per sampled user", "round peak above load MB", "budget s (one-off)",
               "node build s"] + (["round GPU peak MB"] if cuda else []),
              round_rows(res, cuda)),
        "",
        *[f"- {v}" for v in verdicts(res, cuda)],
        "",
        f"Profiled round (cProfile, own time): the functions whose time grew most from "
        f"{sizes[0]:,} to {sizes[-1]:,} users, per combination:" if len(sizes) > 1 else "",
        "",
        table(["algorithm", "privacy", "function", f"s at {sizes[0]:,}", f"s at {sizes[-1]:,}"],
              profile_rows(res)) if len(sizes) > 1 else "",
        "",
        "Many clients, in-process (`fedmeta-simulate runtime=inprocess` with the overrides "
        "below; one process holds the round driver and every node, so its RSS is the driver's "
        "memory). *iid100*: "
        f"`{' '.join(federation_overrides('iid100', quick))}`; *user1000*: "
        f"`{' '.join(federation_overrides('user1000', quick))}`. Round 1 trains every training "
        "client; round 2 trains them again and evaluates every client.",
        "",
        table(["federation", "clients", "training clients", "median users per client",
               "build s", "build ms per client", "training round s",
               "training round CPU s", "round with eval s",
               "RSS built MB", "peak RSS MB"] + (["peak GPU MB"] if cuda else []),
              federation_rows(feds, cuda)),
    ]
    return "\n".join(lines)


if os.environ.get("FEDMETA_P4_SIZES"):       # e.g. "1000,10000": a shorter sweep by hand
    SIZES = tuple(int(x) for x in os.environ["FEDMETA_P4_SIZES"].split(","))
