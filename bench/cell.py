"""One measurement in a fresh interpreter: ``python -m bench.cell KIND JSON`` -> one JSON line.

A fresh process per cell keeps peak RSS attributable to that cell alone. Every cell runs on
the bench device (:func:`bench.common.bench_device`, passed in by ``run_cell``'s environment);
its timers synchronise the device and, on CUDA, its peaks include torch's
``max_memory_allocated`` next to RSS.
"""

from __future__ import annotations

import atexit
import json
import shutil
import statistics
import tempfile
import time

from pathlib import Path

import torch

from bench.common import (Timer, cell_main, current_rss_mb, device_overrides, gpu_peak_mb,
                          max_rss_mb, median_time, reset_gpu_peak, synchronize)


def base_overrides(device: str | None = None) -> list[str]:
    """What every cell's experiment starts from: in-process, on the bench device, no plots."""
    return ["runtime=inprocess", *device_overrides(device), "runtime.plots=false"]


def _compose(overrides: list[str]):
    from fedmeta.runtime.hydra_config import compose

    return compose([*base_overrides(), *overrides])


def dp_cell(spec: dict) -> dict:
    """Time one FedAvg local step (plain mean gradient, or DP-SGD in one grad-sample mode)."""
    from fedmeta.algorithms import Objective
    from fedmeta.config import LocalDPConfig
    from fedmeta.privacy.accounting import UserLevelAccountant
    from fedmeta.privacy.local import PrivateStep
    from fedmeta.runtime.federation import initial_parameters
    from fedmeta.runtime.inprocess import build_nodes

    torch.set_num_threads(1)
    cfg = _compose(["data=synthetic_small", f"model={spec['size']}", "algorithm=fedavg",
                    "data.max_eval_users=1", "privacy=none"])
    node = build_nodes(cfg, Path(tempfile.mkdtemp(prefix="fedmeta-bench-")))[0]
    client = node.tasks
    n = spec["users"]
    idx = torch.arange(n) % len(client.train)
    gen = torch.Generator().manual_seed(0)
    batch = Objective.batch(client.train.subset(idx), client.catalog, cfg.algorithm.negatives,
                            gen, node.device)
    params = initial_parameters(cfg, node.device, node.nc.run["catalogues"])
    algo = node.algorithm
    mode = spec["mode"]

    def plain():
        algo.mean_update(params, batch)

    if mode == "plain":
        step = plain
    else:
        dp = LocalDPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                           grad_sample_mode=mode)
        private = PrivateStep(dp, len(client.train), min(1.0, n / len(client.train)), 1.0,
                              torch.Generator().manual_seed(0), UserLevelAccountant("rdp", 1e-5))

        def step():
            private.direction(algo, params, batch)
    rss_setup = current_rss_mb()
    step()                      # the warm-up outside the GPU peak window, as for RSS setup
    synchronize()
    reset_gpu_peak()
    med, times = median_time(step, spec["repeats"], warmup=0)
    peak, gpu_peak = max_rss_mb(), gpu_peak_mb()
    # the plain step again in this process, alternating with the DP step: a ratio taken side
    # by side, which the machine's drift between cells cannot bend
    plain(), step()
    pairs = [(median_time(plain, 1, 0)[0], median_time(step, 1, 0)[0])
             for _ in range(spec["repeats"])]
    out = {"median_s": med, "times": times, "rss_setup_mb": rss_setup, "peak_rss_mb": peak,
           "peak_gpu_mb": gpu_peak,
           "paired_ratio": statistics.median(d / p for p, d in pairs),
           "params": sum(v.numel() for v in params.values()),
           "table_params": sum(v.numel() for k, v in params.items() if k.startswith("items.tokens")),
           "loss": cfg.model.loss, "item_ids": cfg.model.item_ids,
           "catalogue": client.catalog.n_items}
    if mode == "functorch":   # where the step's time goes: per-user gradients vs clip + noise
        cut = algo.objective.compact(params, batch)      # as PrivateStep.direction does
        per_user = algo.user_updates(cut.params, cut.batch)
        out["grads_s"] = median_time(lambda: algo.user_updates(cut.params, cut.batch),
                                     spec["repeats"])[0]
        out["privatize_s"] = median_time(lambda: private.privatize(per_user, params, cut.rows),
                                         spec["repeats"])[0]
        out["rows_read"] = len(cut.rows) if cut.rows is not None else None
    return out


def silo_build_cell(spec: dict) -> dict:
    """Generate the synthetic sources, cut them into silos and write them: a node's data,
    made once (``fedmeta-partition``'s work, timed by part)."""
    from fedmeta.data.silo import write_silos
    from fedmeta.runtime.federation import build_silos, load_data

    cfg = _compose(spec["overrides"])
    t0 = time.perf_counter()
    data = load_data(cfg)
    t1 = time.perf_counter()
    silos = build_silos(cfg, data)
    t2 = time.perf_counter()
    del data
    write_silos(silos, spec["out"])
    t3 = time.perf_counter()
    part = silos[0].partition
    return {"generate_s": t1 - t0, "cut_s": t2 - t1, "write_s": t3 - t2,
            "interactions": len(silos[0].data.interactions), "users": len(part.users),
            "train_users": len(part.train_users), "client": part.client_id,
            "peak_rss_mb": max_rss_mb()}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5), so the peak of
    what follows can be read on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """glibc ``malloc_trim(0)``: return free heap pages, so RSS is what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def silo_round_cell(spec: dict) -> dict:
    """One node on one silo, every (algorithm, privacy) combination in turn.

    The silo is read and its tasks built once (they depend on the data and model configs
    only, the same for every combination; ``build_tasks`` is memoised on those), then for
    each combination: its budget (DP), its node, a timed round and a profiled round (cProfile
    on CPU time; a second timing would double the cell on a loaded machine). Rounds are timed
    in wall and CPU time: with one thread, CPU time is the round's own work, which other
    processes on a loaded machine do not stretch. Peak RSS is reset before the
    rounds, so each combination's round peak is its own. Sampled users are counted where the steps take them (``TaskTensors.subset``).
    """
    import cProfile
    import gc
    import pstats

    import fedmeta.runtime.federation as fed_mod
    import fedmeta.runtime.node as node_mod
    from fedmeta.config import to_dict
    from fedmeta.data.silo import catalogue_sizes, read_silo
    from fedmeta.data.tasks import TaskTensors
    from fedmeta.runtime.federation import initial_parameters, prepare_nodes
    from fedmeta.runtime.node import Node, node_configs

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    silo = read_silo(spec["silo_dir"])
    read_s = time.perf_counter() - t0
    real, cache, built = node_mod.build_tasks, {}, []

    def tasks_once(cfg, s, catalogues=None):
        key = (s.client_id, json.dumps(to_dict(cfg.data), sort_keys=True, default=str),
               json.dumps(to_dict(cfg.model), sort_keys=True, default=str), cfg.seed,
               json.dumps(catalogues, sort_keys=True))
        if key not in cache:
            t = time.perf_counter()
            cache[key] = real(cfg, s, catalogues)
            built.append(time.perf_counter() - t)
        return cache[key]

    node_mod.build_tasks = fed_mod.build_tasks = tasks_once
    base = spec["overrides"]
    state = Path(tempfile.mkdtemp(prefix="fedmeta-bench-state-"))
    atexit.register(shutil.rmtree, state, True)
    # the node's own view of the config (what Node passes to build_tasks), so the cache hits
    first = node_configs(_compose([*base, "algorithm=fedavg", "privacy=none"]), [silo.client_id],
                         Path(spec["silo_dir"]).parent, state / "first",
                         catalogue_sizes([silo]))[0]
    tasks_once(node_mod.experiment_view(first), silo, first.run["catalogues"])
    out = {"read_s": read_s, "tasks_s": built[0], "train_users": len(cache[next(iter(cache))].train),
           "rss_loaded_mb": current_rss_mb(), "peak_load_mb": max_rss_mb(), "combos": []}
    sampled: list[int] = []
    subset = TaskTensors.subset

    def counting(self, idx):
        sampled.append(len(idx))
        return subset(self, idx)

    for algo, dp in spec["combos"]:
        cfg = _compose([*base, f"algorithm={algo}", f"privacy={'local' if dp else 'none'}"])
        t = time.perf_counter()
        # the engine's start-up: a DP node's declared population, then its budget
        nc = prepare_nodes(cfg, [silo], Path(spec["silo_dir"]).parent, state / f"{algo}-{int(dp)}",
                           fresh=True, write=False)[0]
        budget_s = time.perf_counter() - t
        node = Node(nc, silo)
        node_s = time.perf_counter() - t - budget_s
        params = initial_parameters(cfg, node.device, nc.run["catalogues"])
        gc.collect()
        trim_heap()      # freed pages of the previous combination back to the OS first
        reset_peak_rss()
        reset_gpu_peak()
        rss0 = current_rss_mb()
        times, cpu, users = [], [], []
        TaskTensors.subset = counting
        try:
            for r in (1, 2):
                sampled.clear()
                # CPU time (one thread): what the round costs, whatever else the machine runs
                prof = cProfile.Profile(time.process_time) if r == 2 else None
                with Timer() as clock:
                    if prof:
                        prof.enable()
                    node.train(params, r, nc.run)
                    if prof:
                        prof.disable()
                times.append(clock.s)
                cpu.append(clock.cpu_s)
                users.append(sum(sampled))
        finally:
            TaskTensors.subset = subset
        stats = pstats.Stats(prof).stats
        top = sorted(((f"{Path(f).name}:{line}({fn})", tt) for (f, line, fn), (_, _, tt, _, _)
                      in stats.items()), key=lambda kv: -kv[1])[:40]
        out["combos"].append({"algorithm": algo, "dp": dp, "budget_s": budget_s,
                              "population": nc.privacy.population,
                              "node_s": node_s, "round_s": times, "round_cpu_s": cpu,
                              "sampled": users,
                              "round_peak_mb": max_rss_mb() - rss0, "rss_before_mb": rss0,
                              "round_gpu_peak_mb": gpu_peak_mb(),
                              "profile": dict(top), "steps": cfg.algorithm.local_steps})
        del node
    out["tasks_builds"] = len(built)
    return out


def federation_cell(spec: dict) -> dict:
    """The in-process runtime on a many-client federation: build every node, then run the
    round driver (``runtime.rounds`` rounds, evaluation in the last); one process holds the
    driver and every node, so its peak is the in-process driver's memory."""
    from fedmeta.runtime.driver import RoundDriver
    from fedmeta.runtime.federation import initial_parameters
    from fedmeta.runtime.inprocess import InProcessTransport, build_nodes

    torch.set_num_threads(1)
    partial = Path(spec["partial"]) if spec.get("partial") else None

    def note(res: dict) -> dict:    # what finished so far survives a timeout of the cell
        if partial is not None:
            partial.write_text(json.dumps(res))
        return res

    cfg = _compose(spec["overrides"])
    out = Path(tempfile.mkdtemp(prefix="fedmeta-bench-fed-"))
    atexit.register(shutil.rmtree, out, True)
    t0 = time.perf_counter()
    c0 = time.process_time()
    nodes = build_nodes(cfg, out)
    res = note({"build_cpu_s": time.process_time() - c0, "clients": len(nodes),
                "training_clients": sum(not n.tasks.partition.new_client for n in nodes),
                "users_per_client": sorted(len(n.tasks.partition.users)
                                           for n in nodes)[len(nodes) // 2],
                "build_s": time.perf_counter() - t0, "rss_built_mb": current_rss_mb(),
                "peak_built_mb": max_rss_mb(), "round_s": [], "peak_rss_mb": max_rss_mb()})

    marks = [time.process_time()]

    def rounds() -> dict:
        done = [r["seconds"] for r in driver.recorder.rounds]
        return {"round_s": done,
                "round_cpu_s": [b - a for a, b in zip(marks, marks[1:])][:len(done)]}

    def echo(line: str) -> None:    # the driver's progress line, once per finished round
        if len(marks) <= len(driver.recorder.rounds):      # not the end-of-run summary
            marks.append(time.process_time())
        note({**res, **rounds(), "peak_rss_mb": max_rss_mb()})

    catalogues = nodes[0].nc.run["catalogues"]
    driver = RoundDriver(cfg, InProcessTransport(nodes), out,
                         initial_parameters(cfg, nodes[0].device, catalogues), catalogues,
                         echo=echo)
    reset_gpu_peak()
    marks[0] = time.process_time()
    with Timer() as clock:
        driver.run()
    return note({**res, "run_s": clock.s, **rounds(), "peak_rss_mb": max_rss_mb(),
                 "peak_gpu_mb": gpu_peak_mb()})


CELLS = {"dp": dp_cell, "silo_build": silo_build_cell, "silo_round": silo_round_cell,
         "federation": federation_cell}


def main() -> int:
    return cell_main(CELLS)


if __name__ == "__main__":
    raise SystemExit(main())
