"""The P5 workload, built once in fedmeta's venv and read by the peer simulator's runner.

Why a file between the two: the peer runs in its own venv (its pinned dependencies clash with
fedmeta's), and fedmeta's runtime package imports Opacus, dp-accounting and Flower, which that
venv should not need. So the fedmeta side composes the experiment from ``configs/`` with the
same Hydra overrides the ``fedmeta-simulate`` runs get, builds every client's user tasks with
fedmeta's own data layer (synthetic generator, schema checks, partitioner, task builder) and
pickles them with the resolved config. The peer unpickles them and imports only fedmeta's
data classes, model, objective and evaluation protocol.

The build follows the runtime's steps: generate -> validate -> drop short users -> partition
each domain -> per-domain catalogue and sequences -> per-client tasks. What it cannot promise
is the runtime's per-client task seed (which users are sampled for evaluation when
``data.max_eval_users`` caps them, and the peer's own batch draws): the *sizes* are the same,
the draws are not, so the peer's quality figures agree with fedmeta's in magnitude only.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

FORMAT = 1

# the part of a config the two sides must share for "the same workload"
SHARED = ("seed", "data", "model", "algorithm", "privacy")
SHARED_RUNTIME = ("rounds", "fraction_train", "eval_every")


class WorkloadError(ValueError):
    """A config the peer cannot mirror (the message says which key)."""


def check_mirrorable(cfg) -> None:
    """Refuse what the peer side does not implement, instead of silently training another thing."""
    problems = []
    if cfg.algorithm.name != "fedavg":
        problems.append(f"algorithm.name={cfg.algorithm.name!r} (the peer runs FedAvg only)")
    if cfg.data.source != "synthetic":
        problems.append(f"data.source={cfg.data.source!r} (synthetic only)")
    if cfg.model.pretrained != "none" or cfg.model.lora.enabled:
        problems.append("model.pretrained / model.lora (the tiny-to-large presets only)")
    if cfg.model.private_item_embeddings:
        problems.append("model.private_item_embeddings (no per-client tables on the peer)")
    if cfg.privacy.local.enabled:
        problems.append("privacy.local.enabled (the peer mirrors central DP only)")
    central = cfg.privacy.central
    if central.enabled and (central.clipping != "fixed" or central.side != "server"):
        problems.append("privacy.central: only server-side fixed clipping is mirrored")
    if cfg.runtime.fraction_train != 1.0:
        problems.append("runtime.fraction_train != 1 (the cohort is every training client)")
    if cfg.runtime.eval_every != 0:
        problems.append("runtime.eval_every != 0 (the peer evaluates after the last round only)")
    if cfg.algorithm.server_optimizer != "sgd":
        problems.append("algorithm.server_optimizer != 'sgd'")
    if problems:
        raise WorkloadError("; ".join(problems))


def compose(overrides: list[str]):
    """The resolved ExperimentConfig, exactly as ``fedmeta-simulate`` composes it."""
    from fedmeta.runtime.hydra_config import compose as hydra_compose

    return hydra_compose(list(overrides))


def build_clients(cfg) -> list:
    """Every client's :class:`~fedmeta.data.tasks.ClientTasks`, in federation order."""
    from fedmeta.config import MODEL_SIZES
    from fedmeta.data.partition import partition_domain
    from fedmeta.data.schema import filter_min_interactions, validate
    from fedmeta.data.synthetic import SyntheticConfig, generate
    from fedmeta.data.tasks import Catalog, build_client_tasks, user_sequences
    from fedmeta.model.features import HashFeaturizer, SharedItemIds, featurize_items

    d = cfg.data
    data = validate(generate(SyntheticConfig(**{"seed": d.seed, **d.synthetic})), "synthetic")
    data = filter_min_interactions(data, d.min_interactions, "synthetic")
    featurizer = HashFeaturizer(MODEL_SIZES[cfg.model.size].vocab, cfg.model.max_tokens_per_item)
    catalogs, seqs = {}, {}
    sizes = {domain: len(data.domain(domain).items) for domain in data.domains}
    layout = SharedItemIds.for_catalogues(sizes) if cfg.model.item_ids == "shared" else None
    for domain in data.domains:
        dom = data.domain(domain)
        items = dom.items.sort_values("item", kind="stable").reset_index(drop=True)
        feats = featurize_items(items, featurizer, dom.attribute_columns)
        if layout is not None:              # the node's own column layout (build_tasks)
            feats = layout.with_ids(feats, domain)
        catalogs[domain] = Catalog(domain, items["item"].tolist(), feats)
        seqs[domain] = user_sequences(dom.interactions, catalogs[domain])
    parts = []
    for spec in d.clients:
        if spec.scheme == "dirichlet":
            raise WorkloadError("data.clients.scheme=dirichlet is not mirrored by the peer")
        users = data.interactions.loc[data.interactions["domain"] == spec.domain, "user"]
        parts += partition_domain(sorted(users.unique().tolist()), spec.domain, spec.n_clients,
                                  scheme=spec.scheme, alpha=spec.alpha,
                                  cold_fraction=d.cold_fraction, new_clients=spec.new_clients,
                                  seed=d.seed)
    return [build_client_tasks(p, seqs[p.domain], catalogs[p.domain], d.max_len,
                               d.support_fraction, d.n_test, d.k_shot, d.max_eval_users,
                               seed=cfg.seed + i)
            for i, p in enumerate(parts)]


def catalogues(clients: list) -> dict[str, int]:
    """The federation's catalogue sizes (what sizes the shared item-ID table)."""
    return dict(sorted({c.catalog.domain: c.catalog.n_items for c in clients}.items()))


def describe(clients: list) -> dict:
    """Sizes that must match fedmeta's own federation: users per client, catalogue items."""
    return {c.client_id: {"train_users": len(c.train), "cold_users": len(c.partition.cold_users),
                          "warm_eval": len(c.warm_eval), "cold_eval": len(c.cold_eval),
                          "items": c.catalog.n_items, "new_client": bool(c.partition.new_client)}
            for c in clients}


def export(overrides: list[str], path: str | Path) -> dict:
    """Compose, check, build and pickle; returns :func:`describe` of what was written."""
    cfg = compose(overrides)
    check_mirrorable(cfg)
    clients = build_clients(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump({"format": FORMAT, "overrides": list(overrides), "cfg": cfg,
                     "clients": clients}, fh)
    return describe(clients)


def load(path: str | Path) -> tuple:
    """(config, clients) from :func:`export` (same checkout on both sides, so same classes)."""
    with Path(path).open("rb") as fh:
        blob = pickle.load(fh)
    if blob.get("format") != FORMAT:
        raise WorkloadError(f"{path}: workload format {blob.get('format')} != {FORMAT}")
    return blob["cfg"], blob["clients"]


def shared_config(cfg) -> dict:
    """The workload-defining part of a config as plain data (runtime settings excluded)."""
    from fedmeta.config import to_dict

    plain = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out = {k: plain[k] for k in SHARED if k in plain}
    out["runtime"] = {k: plain.get("runtime", {}).get(k) for k in SHARED_RUNTIME}
    return out


def leaves(tree, prefix: str = "") -> dict:
    """Dotted keys -> values of a nested dict (lists compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(peer: dict, fedmeta: dict) -> list[str]:
    """Dotted keys of the shared sections whose values differ (a key on one side only counts)."""
    fm = leaves({k: fedmeta.get(k) for k in peer if k != "runtime"})
    fm.update(leaves({"runtime": {k: (fedmeta.get("runtime") or {}).get(k)
                                  for k in SHARED_RUNTIME}}))
    pe, missing = leaves(peer), object()
    return sorted(k for k in set(pe) | set(fm) if pe.get(k, missing) != fm.get(k, missing))
