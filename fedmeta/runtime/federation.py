"""Config -> a ready federation: sources, per-domain frames, client partitions, user tasks,
the shared model and the algorithm. Both runtimes (in-process and Flower) start here, so
they train exactly the same thing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedmeta.algorithms import Algorithm, Objective, build_algorithm
from fedmeta.config import MODEL_SIZES, ConfigError, ExperimentConfig
from fedmeta.data.partition import ClientPartition, partition_domain
from fedmeta.data.schema import DataError, InteractionData, filter_min_interactions, validate
from fedmeta.data.tasks import Catalog, ClientTasks, build_client_tasks, user_sequences
from fedmeta.model.features import HashFeaturizer, TokenizerFeaturizer, featurize_items, with_item_ids
from fedmeta.model.recommender import (SequenceRecommender, build_model, meta_parameters, minilm_dir,
                                      private_parameters)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(cfg: ExperimentConfig) -> InteractionData:
    """Sources -> one validated multi-domain frame."""
    d = cfg.data
    if d.source == "synthetic":
        from dataclasses import fields

        from fedmeta.data.synthetic import SyntheticConfig, generate

        known = {f.name for f in fields(SyntheticConfig)}
        unknown = sorted(set(d.synthetic) - known)
        if unknown:
            raise ConfigError(f"data.synthetic: unknown key(s) {unknown}; valid: {sorted(known)}")
        data = generate(SyntheticConfig(**{"seed": d.seed, **d.synthetic}))
        source = "synthetic"
    else:
        from fedmeta.data.loaders import load_source
        from fedmeta.data.packaged import load_packaged

        parts = []
        for i, src in enumerate(d.real):
            kwargs = dict(src.options)
            if src.domain:
                kwargs["domain"] = src.domain
            try:
                part = (load_packaged(src.kind, **kwargs) if src.path is None
                        else load_source(src.kind, path=src.path, **kwargs))
            except TypeError as err:
                raise DataError(f"data.real[{i}].options: {err}") from err
            parts.append(part)
        data = InteractionData.concat(parts)
        source = "+".join(s.kind for s in d.real)
    data = validate(data, source)
    return filter_min_interactions(data, d.min_interactions, source)


def featurizer_for(cfg: ExperimentConfig):
    width = cfg.model.max_tokens_per_item
    if cfg.model.pretrained == "minilm":
        from transformers import AutoTokenizer

        return TokenizerFeaturizer(AutoTokenizer.from_pretrained(str(minilm_dir()),
                                                                 local_files_only=True), width)
    return HashFeaturizer(MODEL_SIZES[cfg.model.size][4], width)


@dataclass
class Federation:
    cfg: ExperimentConfig
    clients: list[ClientTasks]
    model: SequenceRecommender
    algorithm: Algorithm
    device: torch.device

    @property
    def training_clients(self) -> list[ClientTasks]:
        return [c for c in self.clients if not c.partition.new_client]

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in meta_parameters(self.model).items()}

    def initial_private(self) -> dict[str, torch.Tensor]:
        """A client's private item table before it trains: zeros (empty without a table).

        Never read back from the live model: the Opacus paths load each client's values into
        it, so it may hold the last client's table."""
        return {k: torch.zeros_like(v, device=self.device)
                for k, v in private_parameters(self.model).items()}

    def client(self, client_id: str) -> ClientTasks:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise KeyError(f"unknown client {client_id!r}; known: {[c.client_id for c in self.clients]}")


def partitions(cfg: ExperimentConfig, data: InteractionData) -> list[ClientPartition]:
    out = []
    known = data.domains
    for spec in cfg.data.clients:
        if spec.domain not in known:
            raise DataError(f"data.clients: domain {spec.domain!r} is not in the data "
                            f"(domains found: {known})")
        users = data.interactions.loc[data.interactions["domain"] == spec.domain, "user"]
        users = sorted(users.unique().tolist())
        labels = None
        if spec.scheme == "dirichlet":
            labels = _dominant_attribute(data.domain(spec.domain))
        out.extend(partition_domain(users, spec.domain, spec.n_clients, scheme=spec.scheme,
                                    alpha=spec.alpha, labels=labels,
                                    cold_fraction=cfg.data.cold_fraction,
                                    new_clients=spec.new_clients, seed=cfg.data.seed))
    return out


def _dominant_attribute(data: InteractionData):
    """A per-user label for Dirichlet skew: the user's most frequent first-attribute value."""
    cols = data.attribute_columns
    if not cols:
        raise DataError("data.clients.scheme=dirichlet needs an item attribute to skew on, "
                        f"but domain {data.domains} has none")
    attr = data.items.set_index("item")[cols[0]].astype(str).str.split("/").str[0]
    lab = data.interactions.assign(label=data.interactions["item"].map(attr))
    return lab.groupby("user")["label"].agg(lambda s: s.value_counts().index[0])


def build_federation(cfg: ExperimentConfig, data: InteractionData | None = None) -> Federation:
    data = data if data is not None else load_data(cfg)
    featurizer = featurizer_for(cfg)
    catalogs, seqs = {}, {}
    for domain in data.domains:
        dom = data.domain(domain)
        items = dom.items.sort_values("item", kind="stable").reset_index(drop=True)
        feats = featurize_items(items, featurizer, dom.attribute_columns)
        if cfg.model.private_item_embeddings:
            feats = with_item_ids(feats)
        catalogs[domain] = Catalog(domain, items["item"].tolist(), feats)
        seqs[domain] = user_sequences(dom.interactions, catalogs[domain])
    clients = []
    for i, part in enumerate(partitions(cfg, data)):
        d = cfg.data
        clients.append(build_client_tasks(part, seqs[part.domain], catalogs[part.domain],
                                          d.max_len, d.support_fraction, d.n_test, d.k_shot,
                                          d.max_eval_users, seed=cfg.seed + i))
    if cfg.runtime.threads > 0:   # oversubscribed CPUs make torch's default far slower than 1 thread
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    private_rows = (max(c.n_items for c in catalogs.values()) + 3
                    if cfg.model.private_item_embeddings else 0)   # items, PAD, BOS, id 0
    model = build_model(cfg.model, cfg.data.max_len, seed=cfg.seed,
                        private_rows=private_rows).to(device)
    model.train()
    algorithm = build_algorithm(cfg.algorithm, Objective(model))
    log.info("federation: %d clients (%d training), %d catalogue items, model %s with %d "
             "meta-parameters (+%d private per client) on %s", len(clients),
             sum(not c.partition.new_client for c in clients),
             sum(c.n_items for c in catalogs.values()), cfg.model.size,
             sum(p.numel() for p in meta_parameters(model).values()),
             sum(p.numel() for p in private_parameters(model).values()), device)
    return Federation(cfg, clients, model, algorithm, device)
