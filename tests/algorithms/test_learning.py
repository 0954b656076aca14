"""Every algorithm learns on synthetic data: the (post-adaptation) query loss falls over
rounds, and a trained FedAvg model ranks cold-start users' items better than an untrained one.

Built from the data layer directly (generator, partitions, tasks), one server step per round
over every training client, so the test checks the algorithms and the objective, not a
runtime's transport.
"""

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS, Objective, ServerOptimizer, Step, build_algorithm
from fedmeta.algorithms.registry import algorithm_config
from fedmeta.config import ModelConfig
from fedmeta.data.partition import partition_domain
from fedmeta.data.synthetic import SyntheticConfig, generate
from fedmeta.data.tasks import Catalog, build_client_tasks, user_sequences
from fedmeta.eval.protocol import evaluate_client
from fedmeta.model.features import HashFeaturizer, SharedItemIds, featurize_items
from fedmeta.model.recommender import build_model, meta_parameters

MAX_LEN = 30


def _clients(seed=0, users=100, items=200):
    data = generate(SyntheticConfig(seed=seed, ecommerce_users=users, social_users=users,
                                    ecommerce_items=items, social_items=items, mean_length=20.0))
    layout = SharedItemIds.for_catalogues({d: len(data.domain(d).items) for d in data.domains})
    clients = []
    for domain in sorted(data.domains):
        dom = data.domain(domain)
        table = dom.items.sort_values("item", kind="stable").reset_index(drop=True)
        feats = layout.with_ids(featurize_items(table, HashFeaturizer(4096, 12),
                                                dom.attribute_columns), domain)
        catalog = Catalog(domain, table["item"].tolist(), feats)
        seqs = user_sequences(dom.interactions, catalog)
        users_ = sorted(dom.interactions["user"].unique().tolist())
        for i, part in enumerate(partition_domain(users_, domain, 3, cold_fraction=0.2,
                                                  new_clients=1, seed=seed)):
            clients.append(build_client_tasks(part, seqs, catalog, MAX_LEN, 0.5, 2, 5, 40,
                                              seed=seed + i))
    return clients, layout.rows


@pytest.fixture(scope="module")
def data():
    return _clients()


def _federation(name, data, **algo):
    clients, rows = data
    model = build_model(ModelConfig(size="tiny"), MAX_LEN, seed=0, item_rows=rows)
    model.train()
    cfg = algorithm_config({"name": name, "local_steps": 3, "users_per_step": 12, **algo})
    return build_algorithm(cfg, Objective(model)), [c for c in clients if not c.partition.new_client]


def _train(algorithm, training, rounds):
    server = ServerOptimizer(meta_parameters(algorithm.objective.model), "sgd", 1.0)
    params, gen = server.current(), torch.Generator().manual_seed(0)
    for _ in range(rounds):
        params = server.step([algorithm.client_update(params, c, gen, Step()) for c in training])
    return params


def _query_loss(algorithm, training, params, steps):
    """Mean query loss of every training client's tasks after ``steps`` inner steps."""
    obj, total, n = algorithm.objective, 0.0, 0
    for client in training:
        batch = obj.batch_for(client.train, client.catalog, 32,
                              torch.Generator().manual_seed(99), torch.device("cpu"))
        if steps:
            p = {k: v.detach() for k, v in algorithm.adapt_users(params, batch, steps).items()}
            losses = obj.per_user_params(lambda q, u: obj.loss(q, u, "query"), p, batch)
        else:
            with torch.no_grad():
                losses = obj.batch_loss(params, batch, "query")
        total += float(losses.sum())
        n += len(losses)
    return total / n


# FedAvg stays in the quick tier (``-m "not slow"``); the meta-learners take 2-4x longer each
@pytest.mark.parametrize("name", [n if n == "fedavg" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(ALGORITHMS)])
def test_query_loss_decreases_over_rounds(name, data):
    algorithm, training = _federation(name, data)
    steps = algorithm.cfg.eval_steps
    before = _query_loss(algorithm, training, meta_parameters(algorithm.objective.model), steps)
    after = _query_loss(algorithm, training, _train(algorithm, training, 3), steps)
    assert after < 0.9 * before, (name, before, after)


def _cold_ndcg(algorithm, clients, params):
    rows = [r for i, c in enumerate(clients) if not c.partition.new_client
            for r in evaluate_client(algorithm, params, c, algorithm.cfg.eval_steps, i,
                                     torch.device("cpu"), phases=("after",))
            if r["population"] == "cold"]
    users = {r["client"]: r["value"] for r in rows if r["metric"] == "users"}
    vals = [(r["value"], users[r["client"]]) for r in rows if r["metric"] == "ndcg@10"]
    return sum(v * w for v, w in vals) / sum(w for _, w in vals)


@pytest.mark.slow
def test_training_ranks_cold_users_items_better_than_the_untrained_model(data):
    algorithm, training = _federation("fedavg", data)
    untrained = _cold_ndcg(algorithm, data[0], meta_parameters(algorithm.objective.model))
    trained = _cold_ndcg(algorithm, data[0], _train(algorithm, training, 3))
    assert trained > 1.5 * untrained, (untrained, trained)
