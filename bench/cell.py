"""One measurement in a fresh interpreter: ``python -m bench.cell KIND JSON`` -> one JSON line.

A fresh process per cell keeps peak RSS attributable to that cell alone.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time

from pathlib import Path

import torch

from bench.common import current_rss_mb, max_rss_mb, median_time


def _compose(overrides: list[str]):
    from fedmeta.runtime.hydra_config import compose

    return compose(["runtime=inprocess", "runtime.device=cpu", "runtime.plots=false", *overrides])


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
    params = initial_parameters(cfg, node.device)
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
    med, times = median_time(step, spec["repeats"], warmup=1)
    peak = max_rss_mb()
    # the plain step again in this process, alternating with the DP step: a ratio taken side
    # by side, which the machine's drift between cells cannot bend
    plain(), step()
    pairs = [(median_time(plain, 1, 0)[0], median_time(step, 1, 0)[0])
             for _ in range(spec["repeats"])]
    out = {"median_s": med, "times": times, "rss_setup_mb": rss_setup, "peak_rss_mb": peak,
           "paired_ratio": statistics.median(d / p for p, d in pairs),
           "params": sum(v.numel() for v in params.values()),
           "table_params": sum(v.numel() for k, v in params.items() if k.startswith("items.tokens"))}
    if mode == "functorch":   # where the step's time goes: per-user gradients vs clip + noise
        cut = algo.objective.compact(params, batch)      # as PrivateStep.direction does
        per_user = algo.user_updates(cut.params, cut.batch)
        out["grads_s"] = median_time(lambda: algo.user_updates(cut.params, cut.batch),
                                     spec["repeats"])[0]
        out["privatize_s"] = median_time(lambda: private.privatize(per_user, params, cut.rows),
                                         spec["repeats"])[0]
        out["rows_read"] = len(cut.rows) if cut.rows is not None else None
    return out


def scale_cell(spec: dict) -> dict:
    """Data build + one training round over every client, fixed work per client."""
    from fedmeta.config import run_config
    from fedmeta.data.synthetic import SyntheticConfig, scaled
    from fedmeta.runtime.federation import build_silos, initial_parameters, load_data
    from fedmeta.runtime.inprocess import build_nodes

    torch.set_num_threads(1)
    syn = scaled(SyntheticConfig(), spec["interactions"])
    half = spec["clients"] // 2
    clients = ("[" + ",".join(f"{{domain:{d},n_clients:{half},new_clients:0,scheme:iid}}"
                              for d in ("ecommerce", "social")) + "]")
    cfg = _compose(["algorithm=fedavg", "privacy=none",   # the work, not the one-off noise solve
                    f"data.synthetic.ecommerce_users={syn.ecommerce_users}",
                    f"data.synthetic.social_users={syn.social_users}", f"data.clients={clients}",
                    "data.max_eval_users=1", "algorithm.local_steps=1",
                    f"algorithm.users_per_step={spec['users_per_step']}"])
    t0 = time.perf_counter()
    data = load_data(cfg)
    t_data = time.perf_counter() - t0
    nodes = build_nodes(cfg, Path(tempfile.mkdtemp(prefix="fedmeta-bench-")),
                        build_silos(cfg, data))
    t_build = time.perf_counter() - t0 - t_data
    n_rows = len(data.interactions)
    del data
    rss_built = current_rss_mb()
    params = initial_parameters(cfg, nodes[0].device)
    t1 = time.perf_counter()
    training = [n for n in nodes if not n.tasks.partition.new_client]
    active = [n for n in training if len(n.tasks.train)]   # the runtimes drop the rest
    run = run_config(cfg)
    for n in active:
        n.train(params, 1, run)
    t_round = time.perf_counter() - t1
    largest = max(len(n.tasks.train) for n in active)
    return {"interactions": n_rows, "clients": len(active),
            "without_tasks": len(training) - len(active), "data_s": t_data,
            "build_s": t_build, "round_s": t_round, "rss_built_mb": rss_built,
            "peak_rss_mb": max_rss_mb(), "largest_client_users": largest}


CELLS = {"dp": dp_cell, "scale": scale_cell}


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    out = CELLS[kind](spec)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
