"""P6: one node's memory against the size of the federation it belongs to.

A node reads only its own silo directory, so its memory should depend on that silo and not
on how many other silos exist. The figure cuts federations of 2, 8 and 32 equal silos
(``fedmeta-partition``, once per federation), then starts node 0 from its node file in a
fresh interpreter per cell, trains one round and evaluates once, with and without local DP.
Peak RSS is ``VmHWM`` of the node process (:func:`bench.common.max_rss_mb`); the phases
(imports, budget, silo read, node build, round, evaluation) are read in the same process, and
the bytes of the silo frames, task tensors and model are counted directly, so the peak can be
split into import baseline, data and per-step work. Two contrasts: the partition step's own
peak (it holds the whole federation once, by design), and the whole federation built in one
process (``build_silos`` plus one node), which is what every node paid when each one rebuilt
the federation from config.

Cells: ``python -m bench.p6_node KIND JSON`` prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (PYTHON, REPO, cell_main, current_rss_mb, device_overrides,
                          gpu_peak_mb, max_rss_mb, on_cuda, run_json, synchronize, table)

SILOS = (2, 8, 32)
USERS_PER_SILO = 500
QUICK = {"silos": (2, 4), "users": 40}


def overrides(n_silos: int, users_per_silo: int, quick: bool = False) -> list[str]:
    """The default experiment (FOMAML, tiny model, local DP) on ``n_silos`` equal silos.

    Half the silos per synthetic domain, ``users_per_silo`` users each (IID split; the
    generator's cold users with a single interaction are dropped by ``min_interactions``,
    so silos come out a few percent smaller). One torch thread, on the bench device."""
    if n_silos < 2 or n_silos % 2:
        raise ValueError(f"n_silos: {n_silos!r} must be even and >= 2 (half per domain)")
    half = n_silos // 2
    clients = "[" + ",".join(f"{{domain:{d},n_clients:{half},new_clients:0,scheme:iid}}"
                             for d in ("ecommerce", "social")) + "]"
    out = [f"data.synthetic.ecommerce_users={half * users_per_silo}",
           f"data.synthetic.social_users={half * users_per_silo}", f"data.clients={clients}",
           *device_overrides(), "runtime.threads=1"]
    if quick:
        out += ["algorithm.local_steps=1", "data.max_eval_users=5"]
    return out


# ---- measurements (run inside the cell process) --------------------------------------------
def _mark(phases: dict, name: str, t0: float) -> None:
    """RSS, its high-water mark and seconds since ``t0`` at the end of a phase (the device
    synchronised first, so a phase's GPU work is in its time); on CUDA also torch's peak
    allocation so far."""
    synchronize()
    phases[name] = {"rss_mb": current_rss_mb(), "hwm_mb": max_rss_mb(),
                    "s": time.perf_counter() - t0}
    if on_cuda():
        phases[name]["gpu_peak_mb"] = gpu_peak_mb()


def _frame_mb(frames) -> float:
    return sum(float(f.memory_usage(deep=True).sum()) for f in frames) / 2**20


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


#: import baselines, measured in empty interpreters: (label, modules imported)
BASELINES = (("python", ()), ("torch", ("torch",)),
             ("torch + recommender (transformers' BertModel)", ("torch", "fedmeta.model.recommender")),
             ("torch + opacus", ("torch", "opacus")),
             ("node imports (all of the above, pandas, pyarrow)",
              ("torch", "fedmeta.privacy.local", "fedmeta.runtime.node", "fedmeta.data.silo")))


def baseline_cell(spec: dict) -> dict:
    """An empty interpreter, then the imports a node pays for before it reads anything."""
    import importlib

    for name in spec["modules"]:
        importlib.import_module(name)
    return {"rss_mb": current_rss_mb(), "hwm_mb": max_rss_mb()}


def partition_cell(spec: dict) -> dict:
    """``fedmeta-partition`` in this process: its peak is the whole federation, once."""
    import logging

    from fedmeta.tools.nodes import partition_main

    t0 = time.perf_counter()
    rc = partition_main(["--out", spec["out"], *spec["overrides"]])
    logging.disable(logging.CRITICAL)
    if rc != 0:
        raise RuntimeError(f"fedmeta-partition exited {rc}")
    return {"s": time.perf_counter() - t0, "hwm_mb": max_rss_mb(), "rss_mb": current_rss_mb()}


def whole_cell(spec: dict) -> dict:
    """The whole federation in one process (``build_silos``), then node 0 built from it, one
    round (no DP) and one evaluation: a node's cost when it held every silo."""
    import torch

    from fedmeta.runtime.federation import build_silos, initial_parameters
    from fedmeta.runtime.hydra_config import compose
    from fedmeta.runtime.node import Node, NodeConfig

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = compose(spec["overrides"])
    silos = build_silos(cfg)
    phases: dict = {}
    _mark(phases, "silos", t0)
    nc = NodeConfig.load(spec["node_file"])
    nc.privacy = dataclasses.replace(nc.privacy, enabled=False)
    node = Node(nc, next(s for s in silos if s.client_id == nc.client_id))
    _mark(phases, "node", t0)
    params = initial_parameters(node.cfg, catalogues=node.nc.run["catalogues"])
    node.train(params, 1, nc.run)
    node.evaluate(params, 1, nc.run)
    _mark(phases, "eval", t0)
    return {"phases": phases, "silos": len(silos), "train_users": len(node.tasks.train)}


def node_cell(spec: dict) -> dict:
    """One node from its node file: (budget), silo, node, one round, one evaluation."""
    t0 = time.perf_counter()
    phases: dict = {}
    import torch

    import fedmeta.privacy.local  # noqa: F401  (imported by the first DP step otherwise)
    from fedmeta.data.silo import read_silo
    from fedmeta.runtime.federation import initial_parameters
    from fedmeta.runtime.node import Node, NodeConfig, init_budget

    torch.set_num_threads(1)
    _mark(phases, "imports", t0)
    nc = NodeConfig.load(spec["node_file"])
    if not spec["dp"]:       # the operator's choice; privacy is not part of the run config
        nc.privacy = dataclasses.replace(nc.privacy, enabled=False)
    else:
        init_budget(nc)      # fedmeta-node init: reads the silo and builds its tasks once
        _mark(phases, "budget", t0)
    silo = read_silo(nc.silo_dir)
    silo_mb = _frame_mb([silo.data.interactions, silo.data.items])
    n_inter = len(silo.data.interactions)
    _mark(phases, "silo", t0)
    node = Node(nc, silo)
    del silo                 # the node keeps its tasks, not the frames
    tasks = node.tasks
    task_mb = _tensor_mb([tasks.catalog.feats] + [
        t for tt in (tasks.train, tasks.warm_eval, tasks.cold_eval)
        for t in (tt.inputs, tt.targets, tt.support, tt.query, tt.eval_pos)])
    model_mb = _tensor_mb(list(node.model.parameters()))
    _mark(phases, "node", t0)
    params = initial_parameters(node.cfg, catalogues=node.nc.run["catalogues"])
    update = node.train(params, 1, nc.run)
    _mark(phases, "train", t0)
    rows = node.evaluate(params, 1, nc.run)
    _mark(phases, "eval", t0)
    return {"phases": phases, "client": nc.client_id, "train_users": len(tasks.train),
            "silo_users": len(tasks.partition.users),
            "cold_users": len(tasks.partition.cold_users), "interactions": n_inter,
            "silo_frames_mb": silo_mb, "task_tensors_mb": task_mb, "model_mb": model_mb,
            "eval_rows": len(rows), "steps": nc.run["algorithm"]["local_steps"],
            "dp_steps": update.metrics.get("dp_steps")}


def step_cell(spec: dict) -> dict:
    """One local step of the node's algorithm on its first ``users_per_step`` users, as
    ``client_update`` takes it (no DP): its own peak (VmHWM reset first) and the operators
    that allocate the most under the torch profiler, to say where a round's memory goes."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.cell import reset_peak_rss, trim_heap
    from bench.common import reset_gpu_peak
    from fedmeta.algorithms.objective import Objective
    from fedmeta.config import MODEL_SIZES
    from fedmeta.runtime.federation import initial_parameters
    from fedmeta.runtime.node import Node, NodeConfig

    torch.set_num_threads(1)
    nc = NodeConfig.load(spec["node_file"])
    nc.privacy = dataclasses.replace(nc.privacy, enabled=False)
    node = Node(nc)
    cfg, tasks = node.cfg, node.tasks
    params = initial_parameters(cfg, catalogues=node.nc.run["catalogues"])
    users = min(cfg.algorithm.users_per_step, len(tasks.train))
    batch = Objective.batch(tasks.train.subset(torch.arange(users)), tasks.catalog,
                            cfg.algorithm.negatives, torch.Generator().manual_seed(0), node.device)
    gc.collect()
    trim_heap()
    reset_peak_rss()
    reset_gpu_peak()
    before = current_rss_mb()
    node.algorithm.mean_update(params, batch)
    synchronize()
    peak, gpu_peak = max_rss_mb() - before, gpu_peak_mb()
    # on CUDA the step's tensors are device memory: profile that, not the host's
    cuda = on_cuda()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, profile_memory=True) as prof:
        node.algorithm.mean_update(params, batch)
    mem = (lambda e: e.self_device_memory_usage) if cuda else (lambda e: e.self_cpu_memory_usage)
    ops = sorted(((e.key, mem(e) / 2**20, e.count) for e in prof.key_averages()),
                 key=lambda r: -r[1])[:5]
    hidden = MODEL_SIZES[cfg.model.size].hidden
    cand = tuple(batch["cand"].shape)
    return {"algorithm": cfg.algorithm.name, "users": users, "cand_shape": list(cand),
            "step_peak_mb": peak, "step_gpu_peak_mb": gpu_peak, "top_ops": ops, "hidden": hidden,
            # the item-token embeddings of every candidate of every user, float32
            "cand_embeddings_mb": cand[0] * cand[1] * cand[2] * hidden * 4 / 2**20}


CELLS = {"baseline": baseline_cell, "step": step_cell, "partition": partition_cell, "whole": whole_cell,
         "node": node_cell}


# ---- the old design, measured on its own code ------------------------------------------------
OLD_COMMIT = "bc7380d"
OLD_CELL = """
import json, sys, time
from pathlib import Path
def hwm():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) / 1024.0
import torch
torch.set_num_threads(1)
from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import build_federation
from fedmeta.runtime.hydra_config import compose
t0 = time.perf_counter()
base = hwm()
fed = build_federation(compose(json.loads(sys.argv[1])))
built = hwm()
runner = ClientRunner(fed, fed.clients[0].client_id)
params = fed.initial_parameters()
runner.train(params, 1, {})
trained = hwm()
runner.evaluate(params, 1)
print(json.dumps({"imports_hwm_mb": base, "built_hwm_mb": built, "train_hwm_mb": trained,
                  "hwm_mb": hwm(), "s": time.perf_counter() - t0}))
"""


def old_design(ovr: list[str], timeout: float) -> dict:
    """What one SuperNode paid at ``OLD_COMMIT``: the federation rebuilt from config, then
    one client trained and evaluated. Runs that commit's code, extracted with ``git archive``
    into a temporary directory (the checkout is not touched), in the same interpreter."""
    with tempfile.TemporaryDirectory(prefix="fedmeta-old-") as tmp:
        # GIT_DIR, when set, names the repository (a bench run from an exported tree has none)
        archive = subprocess.run(["git", "archive", OLD_COMMIT], cwd=REPO, capture_output=True)
        if archive.returncode != 0:
            why = archive.stderr.decode().strip().splitlines()[:1] or ["?"]
            return {"error": f"git archive {OLD_COMMIT}: {why[0][:100]}"}
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        old = [o for o in ovr if not o.startswith("runtime.threads")]
        return _run([PYTHON, "-c", OLD_CELL, json.dumps(["runtime=inprocess", *old])],
                    timeout, cwd=tmp, env={"PYTHONPATH": tmp})


# ---- driver ----------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float, cwd: Path | str = REPO, env: dict | None = None) -> dict:
    return run_json(cmd, timeout, cwd, {**os.environ, "OMP_NUM_THREADS": "1",
                                        "FLWR_TELEMETRY_ENABLED": "0", **(env or {})})


def code_version() -> str:
    """The commit measured: an exported tree's ``COMMIT`` file, else the checkout's HEAD
    (marked when the checkout has uncommitted changes)."""
    stamp = REPO / "COMMIT"
    if stamp.is_file():
        return f"{stamp.read_text().strip()} (clean export)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def cell(kind: str, spec: dict, timeout: float = 900) -> dict:
    return _run([PYTHON, "-m", "bench.p6_node", kind, json.dumps(spec)], timeout)


def silo_sizes(out: Path) -> list[int]:
    """Users (training + cold) of every silo, from the silos' own ``silo.json``."""
    sizes = []
    for meta in sorted((out / "silos").glob("*/silo.json")):
        m = json.loads(meta.read_text())
        sizes.append(len(m["train_users"]) + len(m["cold_users"]))
    return sizes


def measure(quick: bool, echo=print, old: bool = True) -> dict:
    silos = QUICK["silos"] if quick else SILOS
    users = QUICK["users"] if quick else USERS_PER_SILO
    res: dict = {"users_per_silo": users, "baseline": {}, "fed": {}, "code": code_version()}
    for label, modules in BASELINES:
        res["baseline"][label] = cell("baseline", {"modules": list(modules)}, 300)
    with tempfile.TemporaryDirectory(prefix="fedmeta-p6-") as tmp:
        for n in silos:
            out = Path(tmp) / f"fed{n}"
            ovr = overrides(n, users, quick)
            fed = {"overrides": ovr, "partition": cell("partition", {"out": str(out),
                                                                     "overrides": ovr})}
            if "error" not in fed["partition"]:
                sizes = silo_sizes(out)
                fed["silo_users"] = [min(sizes), max(sizes)]
                node_file = str(out / "nodes" / "node-0.json")
                for dp in (False, True):
                    fed["dp" if dp else "plain"] = cell("node", {"node_file": node_file, "dp": dp})
                fed["whole"] = cell("whole", {"overrides": ovr, "node_file": node_file})
                if n == silos[0]:
                    res["step"] = cell("step", {"node_file": node_file})
                if old:
                    fed["old"] = old_design(ovr, 900)
            res["fed"][n] = fed
            echo(f"P6 {n} silos: partition {_get(fed, 'partition', 'hwm_mb')} MB, node "
                 f"{_get(fed, 'plain', 'phases', 'eval', 'hwm_mb')} / "
                 f"{_get(fed, 'dp', 'phases', 'eval', 'hwm_mb')} MB (none / local DP)")
    echo("P6 raw: " + json.dumps(res))
    return res


# ---- report ----------------------------------------------------------------------------------
FLAT = 0.05      # "flat": the node's peak varies by at most this share over the sweep


def _get(r, *path, default="failed"):
    for key in path:
        if not isinstance(r, dict) or key not in r:
            return default
        r = r[key]
    return r


def _feds(res: dict) -> list[tuple[int, dict]]:
    return sorted(((int(n), fed) for n, fed in res["fed"].items()), key=lambda kv: kv[0])


MODES = (("plain", "none"), ("dp", "local"))


def node_rows(res: dict, cuda: bool = False) -> list[list]:
    """One row per (federation, privacy); on CUDA a last column adds the node's peak
    ``max_memory_allocated`` after evaluation ("-" where the cell did not record one)."""
    rows = []
    for n, fed in _feds(res):
        for key, label in MODES:
            r = fed.get(key, fed["partition"])
            if "error" in r:
                rows.append([n, label, f"failed: {r['error']}"] + [""] * (7 + cuda))
                continue
            ph = r["phases"]
            gpu = ph["eval"].get("gpu_peak_mb")
            rows.append([n, label, r.get("silo_users", r["train_users"] + r["cold_users"]),
                         r["train_users"], ph["imports"]["rss_mb"],
                         ph["node"]["rss_mb"], ph["train"]["hwm_mb"], ph["eval"]["hwm_mb"],
                         ph["train"]["s"] - ph["node"]["s"], ph["eval"]["s"] - ph["train"]["s"]]
                        + ([gpu if gpu is not None else "-"] if cuda else []))
    return rows


def breakdown_rows(res: dict) -> list[list]:
    """The node's peak, split: imports, (budget), silo read, node build, round, evaluation.

    Each figure is the rise of RSS (load phases) or of the high-water mark (round, eval)
    over the phase before; the frames, task tensors and model are their own byte counts."""
    rows = []
    for n, fed in _feds(res):
        for key, label in MODES:
            r = fed.get(key)
            if not r or "error" in r:
                continue
            ph = r["phases"]
            load0 = ph.get("budget", ph["imports"])
            rows.append([n, label, ph["imports"]["rss_mb"],
                         load0["hwm_mb"] - ph["imports"]["rss_mb"],
                         ph["node"]["rss_mb"] - load0["rss_mb"],
                         r["silo_frames_mb"], r["task_tensors_mb"], r["model_mb"],
                         ph["train"]["hwm_mb"] - max(ph["node"]["rss_mb"], load0["hwm_mb"]),
                         ph["eval"]["hwm_mb"] - ph["train"]["hwm_mb"]])
    return rows


def contrast_rows(res: dict) -> list[list]:
    rows = []
    for n, fed in _feds(res):
        users = _get(fed, "silo_users", default=None)
        old = fed.get("old", {"error": "not run"})
        rows.append([n, n * res["users_per_silo"],
                     users[0] if users else "failed", users[1] if users else "failed",
                     _get(fed, "partition", "hwm_mb"), _get(fed, "partition", "s"),
                     _get(fed, "whole", "phases", "node", "hwm_mb"),
                     _get(fed, "whole", "phases", "eval", "hwm_mb"),
                     _get(fed, "plain", "phases", "eval", "hwm_mb"),
                     _get(old, "built_hwm_mb", default=old.get("error", "failed")),
                     _get(old, "hwm_mb", default=old.get("error", "failed"))])
    return rows


def spread(values: list[float]) -> float:
    """(max - min) / min: how much a quantity varies over the sweep."""
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else float("nan")


def verdicts(res: dict) -> list[str]:
    out = []
    feds = _feds(res)
    for key, label in MODES:
        peaks = [(n, fed[key]["phases"]["eval"]["hwm_mb"]) for n, fed in feds
                 if "phases" in fed.get(key, {})]
        if len(peaks) < 2:
            out.append(f"privacy={label}: fewer than two cells finished, no verdict.")
            continue
        vals = [p for _, p in peaks]
        sp = spread(vals)
        out.append(f"privacy={label}: node peak RSS {min(vals):.0f}-{max(vals):.0f} MB over "
                   f"{peaks[0][0]}-{peaks[-1][0]} silos ({max(vals) - min(vals):.0f} MB, "
                   f"{sp:.1%}) -> target 'flat in the number of silos' "
                   f"**{'met' if sp <= FLAT else 'missed'}** (flat = within {FLAT:.0%}).")
    done = [(n, fed) for n, fed in feds if "phases" in fed.get("plain", {})]
    if done:
        n, fed = done[-1]
        r = fed["plain"]
        ph = r["phases"]
        peak, imp = ph["eval"]["hwm_mb"], ph["imports"]["rss_mb"]
        load = ph["node"]["rss_mb"] - imp
        work = peak - ph["node"]["rss_mb"]
        objects = r["silo_frames_mb"] + r["task_tensors_mb"] + r["model_mb"]
        out.append(f"Where the peak goes (privacy=none, {n} silos, {peak:.0f} MB): imports "
                   f"{imp:.0f} MB ({imp / peak:.0%}); reading the silo and building the node "
                   f"{load:.0f} MB, of which the silo's frames, task tensors and model are "
                   f"{objects:.1f} MB (the rest is paid once per process, not per object: a "
                   f"DP node pays it in its budget step and then only a few MB for the node, "
                   f"so it is first-use allocation by pandas, pyarrow and torch); the round's "
                   f"work {work:.0f} MB ({work / peak:.0%}).")
    whole = [(n, fed["whole"]["phases"]["node"]["hwm_mb"], fed["plain"]["phases"]["node"]["rss_mb"])
             for n, fed in done if "phases" in fed.get("whole", {})]
    if len(whole) >= 2:
        (n0, w0, o0), (n1, w1, o1) = whole[0], whole[-1]
        out.append(f"Holding the whole federation instead (the same-code stand-in for the old "
                   f"design): memory after load {w0:.0f} -> {w1:.0f} MB from {n0} to {n1} silos "
                   f"(+{w1 - w0:.0f} MB, growing with the federation's users); a node with its own "
                   f"silo only: {o0:.0f} -> {o1:.0f} MB.")
    parts = [(n, fed["partition"]["hwm_mb"]) for n, fed in feds if "hwm_mb" in fed["partition"]]
    if len(parts) >= 2:
        out.append(f"The partition step grows with the federation, as designed: peak "
                   f"{parts[0][1]:.0f} MB at {parts[0][0]} silos, {parts[-1][1]:.0f} MB at "
                   f"{parts[-1][0]}.")
    return out


def step_text(res: dict) -> str:
    """Where a round's memory goes: one step's own peak and its largest allocators."""
    st = res.get("step")
    if not st or "error" in st:
        return f"One-step memory profile: {st.get('error') if st else 'not run'}."
    ops = "; ".join(f"`{name}` {mb:.0f} MB in {count} calls" for name, mb, count in st["top_ops"])
    b, c, w = st["cand_shape"]
    return (f"One {st['algorithm']} step of {st['users']} users (no DP, node 0 of the smallest "
            f"federation): its own peak is {st['step_peak_mb']:.0f} MB above the loaded node"
            + (f" (RSS; on the GPU torch allocated {st['step_gpu_peak_mb']:.0f} MB at peak)"
               if st.get("step_gpu_peak_mb") is not None else "") + ". "
            f"The full-catalogue loss gives every user the whole catalogue as candidates "
            f"(`cand` {b} x {c} items x {w} tokens, an expanded view), and the item encoder "
            f"embeds it per user: {st['cand_embeddings_mb']:.0f} MB of float32 token embeddings "
            f"per forward pass (x {st['hidden']} dims), once per inner step and once more for "
            f"the outer loss. Largest allocators under the torch profiler (memory allocated "
            f"over the step, not live at once): {ops}.")


def run(quick: bool, echo=print) -> str:
    res = measure(quick, echo)
    base = [[label, _get(r, "rss_mb", default=r.get("error", "failed"))]
            for label, r in res["baseline"].items()]
    return "\n".join([
        "## P6 Per-node memory",
        "",
        f"Federations of {', '.join(str(n) for n, _ in _feds(res))} equal silos, "
        f"{res['users_per_silo']} synthetic users per silo (half the silos per domain, IID; "
        "single-interaction users are dropped by `min_interactions`, so silos come out a few "
        "percent smaller), the default experiment otherwise (FOMAML, tiny model, 10 local "
        "steps of 32 users, every user of the silo evaluated), one torch thread. Each "
        "federation is cut once with `fedmeta-partition`; then node 0 (an e-commerce silo) "
        "starts from its node file in a fresh process, builds its budget (local DP: "
        "`init_budget`, as `fedmeta-node init` does), reads its silo, trains one round and "
        "evaluates once. Peak = the process's VmHWM"
        + (" (on the GPU: also torch.cuda.max_memory_allocated, and the one-step profile "
           "counts device memory)" if on_cuda() else "") + ". Code measured: "
        f"{res.get('code', code_version())}.",
        "",
        "```", "fedmeta-bench --only P6", "```",
        "",
        table(["silos", "privacy", "silo users", "training users", "RSS after imports MB",
               "RSS after load MB",
               "peak RSS after round MB", "peak RSS after eval MB", "round s", "eval s"]
              + (["peak GPU MB after eval"] if on_cuda() else []), node_rows(res, on_cuda())),
        "",
        *[f"- {v}" for v in verdicts(res)],
        "",
        "Where a node's memory goes (MB; load rows are rises of RSS, round and eval rises of "
        "the high-water mark; frames, tensors and model are byte counts of the objects):",
        "",
        table(["silos", "privacy", "imports MB", "budget (DP) MB", "silo + node build MB",
               "silo frames MB", "task tensors MB", "model MB", "round above load MB",
               "eval above round MB"], breakdown_rows(res)),
        "",
        step_text(res),
        "",
        "Import baseline, each in an empty interpreter:",
        "",
        table(["imports", "RSS MB"], base),
        "",
        "Contrast: what holds the whole federation (privacy none). *partition*: "
        "`fedmeta-partition` itself (all silos in one process, once). *whole federation + "
        "node*: `build_silos` of the whole federation, then node 0 built from it, one round "
        "and one evaluation (same code as above; the stand-in for the old design). *own silo "
        "only*: the node process of the first table. *old design*: "
        f"commit {OLD_COMMIT}'s SuperNode path run on its own "
        "code (`git archive`): `build_federation` of the whole federation from config, then "
        "one client's round and evaluation; its training step is that commit's, so compare "
        "its peak after build, not its round.",
        "",
        table(["silos", "federation users (nominal)", "fewest silo users",
               "most silo users", "partition peak MB",
               "partition s", "whole federation + node, after load MB",
               "whole federation + node, round + eval MB", "own silo only, round + eval MB",
               "old design, after build MB", "old design, round + eval MB"],
              contrast_rows(res)),
    ])


def main() -> int:
    return cell_main(CELLS)


if __name__ == "__main__":
    raise SystemExit(main())
