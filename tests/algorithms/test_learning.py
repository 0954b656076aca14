"""Every algorithm lowers the (post-adaptation) query loss over rounds on synthetic data."""

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS
from fedmeta.algorithms.objective import Objective
from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import build_federation, load_data
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.server import MetaServer

BASE = ["runtime=inprocess", "privacy=none", "data=synthetic_small", "data.synthetic.ecommerce_users=100",
        "data.synthetic.social_users=100", "algorithm.local_steps=3", "algorithm.users_per_step=12"]


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def _query_loss(fed, params, steps):
    """Mean query loss of every training client's tasks after ``steps`` inner steps."""
    total, n = 0.0, 0
    for client in fed.training_clients:
        batch = Objective.batch(client.train, client.catalog, 32,
                                torch.Generator().manual_seed(99), fed.device)
        p = params
        if steps:
            p = {k: v.detach() for k, v in fed.algorithm.adapt_users(params, batch, steps).items()}
            losses = fed.algorithm.objective.per_user_params(
                lambda q, u: fed.algorithm.objective.loss(q, u, "query"), p, batch)
        else:
            with torch.no_grad():
                losses = fed.algorithm.objective.batch_loss(p, batch, "query")
        total += float(losses.sum())
        n += len(losses)
    return total / n


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_query_loss_decreases_over_rounds(name, data):
    cfg = compose(BASE + [f"algorithm={name}"])
    fed = build_federation(cfg, data)
    server = MetaServer(cfg, fed.initial_parameters())
    steps = cfg.algorithm.eval_steps
    before = _query_loss(fed, server.params, steps)
    runners = [ClientRunner(fed, c.client_id) for c in fed.training_clients]
    for rnd in range(1, 4):
        replies = {r.client_id: r.train(server.params, rnd)[0] for r in runners}
        outcome = server.aggregate(replies)
        assert not outcome.failures
    after = _query_loss(fed, server.params, steps)
    assert after < 0.9 * before, (name, before, after)
