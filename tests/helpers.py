"""Small hand-made objects shared by tests (no synthetic generator needed)."""

from __future__ import annotations

import torch

from fedmeta.config import AlgorithmConfig, ModelConfig
from fedmeta.data.partition import ClientPartition
from fedmeta.data.tasks import Catalog, ClientTasks, training_tasks
from fedmeta.model.features import HashFeaturizer, featurize_items
from fedmeta.model.recommender import build_model, meta_parameters


def toy_catalog(n_items: int = 30, width: int = 4, vocab: int = 4096) -> Catalog:
    import pandas as pd

    items = pd.DataFrame({"item": [f"i{j:03d}" for j in range(n_items)], "domain": "toy",
                          "text": [f"word{j % 5} thing{j % 3}" for j in range(n_items)],
                          "category": [f"c{j % 4}/s{j % 2}" for j in range(n_items)]})
    feats = featurize_items(items, HashFeaturizer(vocab, width), ["category"])
    return Catalog("toy", items["item"].tolist(), feats)


def toy_client(n_users: int = 12, max_len: int = 10, seed: int = 0) -> ClientTasks:
    gen = torch.Generator().manual_seed(seed)
    cat = toy_catalog()
    seqs = {f"u{u}": torch.randperm(cat.n_items, generator=gen)[: 4 + u % 5].tolist()
            for u in range(n_users)}
    users = sorted(seqs)
    part = ClientPartition("toy-0", "toy", tuple(users), (), False)
    train = training_tasks(users, seqs, cat, max_len, 0.5, n_test=0)
    return ClientTasks(part, cat, train, train.subset([]), train.subset([]))


def tiny_model(max_len: int = 10, seed: int = 0):
    model = build_model(ModelConfig(size="tiny", item_ids="none"), max_len, seed=seed)
    return model, meta_parameters(model)


def algo_cfg(**kw) -> AlgorithmConfig:
    from fedmeta.algorithms.registry import algorithm_config

    base = dict(inner_steps=2, inner_lr=0.1, local_steps=2, local_lr=0.1, users_per_step=4,
                negatives=8)
    base.update(kw)
    return algorithm_config(base)
