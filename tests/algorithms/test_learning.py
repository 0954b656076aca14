"""Every algorithm lowers the (post-adaptation) query loss over rounds on synthetic data."""

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS
from fedmeta.algorithms.objective import Objective
from fedmeta.config import run_config
from fedmeta.runtime.federation import build_silos, initial_parameters, load_data
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.inprocess import build_nodes
from fedmeta.runtime.server import MetaServer

BASE = ["runtime=inprocess", "privacy=none", "data=synthetic_small", "data.synthetic.ecommerce_users=100",
        "data.synthetic.social_users=100", "algorithm.local_steps=3", "algorithm.users_per_step=12"]


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def _query_loss(nodes, params, steps):
    """Mean query loss of every training client's tasks after ``steps`` inner steps."""
    total, n = 0.0, 0
    for node in nodes:
        client, algo = node.tasks, node.algorithm
        batch = Objective.batch(client.train, client.catalog, 32,
                                torch.Generator().manual_seed(99), node.device)
        p = params
        if steps:
            p = {k: v.detach() for k, v in algo.adapt_users(params, batch, steps).items()}
            losses = algo.objective.per_user_params(
                lambda q, u: algo.objective.loss(q, u, "query"), p, batch)
        else:
            with torch.no_grad():
                losses = algo.objective.batch_loss(p, batch, "query")
        total += float(losses.sum())
        n += len(losses)
    return total / n


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_query_loss_decreases_over_rounds(name, data, tmp_path):
    cfg = compose(BASE + [f"algorithm={name}"])
    nodes = [n for n in build_nodes(cfg, tmp_path, build_silos(cfg, data))
             if not n.tasks.partition.new_client]
    server = MetaServer(cfg, initial_parameters(cfg))
    steps = cfg.algorithm.eval_steps
    before = _query_loss(nodes, server.params, steps)
    run = run_config(cfg)
    for rnd in range(1, 4):
        replies = {n.client_id: n.train(server.params, rnd, run) for n in nodes}
        outcome = server.aggregate(replies)
        assert not outcome.failures
    after = _query_loss(nodes, server.params, steps)
    assert after < 0.9 * before, (name, before, after)
