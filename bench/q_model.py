"""Q-model: what each recommender change does to ranking quality, on synthetic data, in-process.

Builds the pieces directly (synthetic generator, partitions, user tasks, model, objective,
algorithm, the evaluation protocol) instead of going through a runtime, so the measurement
isolates the model and its loss and runs on any revision of them: options the revision does
not know (``model.item_ids``, ``build_model(item_rows=...)``) are detected, not assumed,
which lets one script measure the code before and after a change.

Every client trains every round (FedAvg-style server SGD at rate 1, no DP), then every client
is evaluated after ``finetune_steps`` adaptation steps; NDCG@10 is averaged over users of all
clients (user-weighted), like the README's comparison tables. The popularity baseline ranks
by training interactions of the same split. ``--device`` (default: the bench device, cpu
unless ``fedmeta-bench --device`` set it) is where the model trains and is evaluated.

    OMP_NUM_THREADS=1 python -m bench.q_model --seeds 0 1 2 --algorithm fedavg \
        --set model.item_ids=shared --label ids
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time

import torch

from bench.common import bench_device, synchronize
from fedmeta.algorithms import ServerOptimizer, Step, build_algorithm
from fedmeta.algorithms.objective import Objective
from fedmeta.config import AlgorithmConfig, ModelConfig
from fedmeta.data.partition import partition_domain
from fedmeta.data.synthetic import SyntheticConfig, generate
from fedmeta.data.tasks import Catalog, build_client_tasks, user_sequences
from fedmeta.eval.protocol import evaluate_client, popularity_rows
from fedmeta.model import features
from fedmeta.model.recommender import build_model, meta_parameters

METRIC = "ndcg@10"


@dataclasses.dataclass
class Setup:
    users: int = 800                # per domain
    items: int = 600                # per domain
    clients: int = 5                # per domain, one of them a new client
    rounds: int = 5
    max_eval_users: int = 50
    max_len: int = 50


def _known(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"this revision's {cls.__name__} has no field(s) {unknown}")
    return values


def build_clients(setup: Setup, seed: int, model_cfg: ModelConfig):
    """Synthetic data -> every client's tasks, and the rows of a shared item-ID table (0: none)."""
    data = generate(SyntheticConfig(seed=seed, ecommerce_users=setup.users,
                                    social_users=setup.users, ecommerce_items=setup.items,
                                    social_items=setup.items))
    featurizer = features.HashFeaturizer(4096, model_cfg.max_tokens_per_item)
    shared = getattr(model_cfg, "item_ids", "none") == "shared"
    domains = sorted(data.domains)
    sizes = {d: len(data.domain(d).items) for d in domains}
    layout = features.SharedItemIds.for_catalogues(sizes) if shared else None
    clients = []
    for domain in domains:
        dom = data.domain(domain)
        items = dom.items.sort_values("item", kind="stable").reset_index(drop=True)
        feats = features.featurize_items(items, featurizer, dom.attribute_columns)
        if layout is not None:
            feats = layout.with_ids(feats, domain)
        catalog = Catalog(domain, items["item"].tolist(), feats)
        seqs = user_sequences(dom.interactions, catalog)
        users = sorted(dom.interactions["user"].unique().tolist())
        for i, part in enumerate(partition_domain(users, domain, setup.clients,
                                                  cold_fraction=0.2, new_clients=1, seed=seed)):
            clients.append(build_client_tasks(part, seqs, catalog, setup.max_len, 0.5, 2, 5,
                                              setup.max_eval_users, seed=seed + i))
    return clients, (layout.rows if layout is not None else 0)


def _weighted(rows: list[dict]) -> dict[str, float]:
    """User-weighted NDCG@10 per population over every client."""
    users = {(r["population"], r["client"]): r["value"] for r in rows if r["metric"] == "users"}
    out = {}
    for pop in sorted({p for p, _ in users}):
        vals = [(r["value"], users[(pop, r["client"])]) for r in rows
                if r["population"] == pop and r["metric"] == METRIC and r["stage"] == "after"]
        total = sum(w for _, w in vals)
        out[pop] = sum(v * w for v, w in vals) / total if total else float("nan")
    return out


def run(setup: Setup, seed: int, model_opts: dict, algo_opts: dict,
        device: str | None = None) -> dict:
    dev = torch.device(device or bench_device())
    torch.manual_seed(seed)
    model_cfg = ModelConfig(**_known(ModelConfig, {"size": "tiny", **model_opts}))
    algo_cfg = AlgorithmConfig(**_known(AlgorithmConfig, algo_opts))
    clients, item_rows = build_clients(setup, seed, model_cfg)
    kwargs = {"item_rows": item_rows} if "item_rows" in inspect.signature(build_model).parameters else {}
    model = build_model(model_cfg, setup.max_len, seed=seed, **kwargs).to(dev)
    model.train()
    algorithm = build_algorithm(algo_cfg, Objective(model))
    server = ServerOptimizer(meta_parameters(model), algo_cfg.server_optimizer, algo_cfg.server_lr)
    params = server.current()
    training = [c for c in clients if not c.partition.new_client]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    first_loss = None
    for _ in range(setup.rounds):
        updates = [algorithm.client_update(params, c, gen, Step(), dev) for c in training]
        if first_loss is None:
            first_loss = sum(u.metrics["train_query_loss"] for u in updates) / len(updates)
        params = server.step(updates)
    synchronize(dev.type)
    train_s = time.time() - t0
    rows = []
    for i, c in enumerate(clients):
        rows += evaluate_client(algorithm, params, c, algo_cfg.eval_steps, seed + i,
                                dev, phases=("after",))
    scale = params.get("logit_scale.log.weight")
    return {"seed": seed, "model": _weighted(rows), "popularity": _weighted(popularity_rows(clients, seed)),
            "first_query_loss": first_loss, "train_s": round(train_s, 1),
            "total_s": round(time.time() - t0, 1),
            "logit_scale": None if scale is None else round(float(scale.exp()), 4)}


def _parse_sets(pairs: list[str]) -> tuple[dict, dict]:
    model, algo = {}, {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        group, _, name = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        {"model": model, "algorithm": algo}[group][name] = value
    return model, algo


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithm", default="fedavg")
    ap.add_argument("--set", nargs="*", default=[], help="model.KEY=VALUE / algorithm.KEY=VALUE")
    ap.add_argument("--label", default="")
    ap.add_argument("--rounds", type=int, default=Setup.rounds)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: the bench device (cpu unless FEDMETA_BENCH_DEVICE says)")
    args = ap.parse_args(argv)
    model_opts, algo_opts = _parse_sets(args.set)
    algo_opts = {"name": args.algorithm, "local_steps": args.local_steps, **algo_opts}
    setup = Setup(rounds=args.rounds)
    results = []
    for seed in args.seeds:
        res = run(setup, seed, model_opts, algo_opts, args.device)
        res.update(label=args.label, algorithm=args.algorithm, set=args.set)
        print(json.dumps(res), flush=True)
        results.append(res)
    for who in ("model", "popularity"):
        for pop in ("cold", "warm", "new-client"):
            vals = torch.tensor([r[who][pop] for r in results], dtype=torch.float64)
            sd = float(vals.std()) if len(vals) > 1 else 0.0
            print(f"# {args.label or '-'} {args.algorithm} {who} {pop} {METRIC} "
                  f"{float(vals.mean()):.4f} ± {sd:.4f} (seeds {args.seeds})", file=sys.stderr)


if __name__ == "__main__":
    main()
