"""A client never spends past its privacy budget: it stops training and keeps evaluating."""

import torch

from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import build_federation
from fedmeta.runtime.hydra_config import compose

TINY = ["runtime=inprocess", "privacy=local", "privacy.local.target_epsilon=2.0",
        "data=synthetic_small", "data.synthetic.ecommerce_users=60", "data.synthetic.social_users=60",
        "runtime.rounds=2", "algorithm.local_steps=2", "algorithm.users_per_step=6",
        "data.max_eval_users=4"]


def test_exhausted_budget_stops_training_but_not_evaluation():
    cfg = compose(TINY)
    fed = build_federation(cfg)
    runner = ClientRunner(fed, fed.training_clients[0].client_id)
    params = fed.initial_parameters()
    state, eps = {}, []
    for rnd in (1, 2):                       # the planned run fits the budget exactly
        update, state = runner.train(params, rnd, state)
        assert update.num_tasks > 0 and "budget_exhausted" not in update.metrics
        eps.append(state["epsilon"])
    assert 0 < eps[0] < eps[1] <= 2.0
    update, after = runner.train(params, 3, state)   # one round more than planned
    assert update.num_tasks == 0 and update.metrics["budget_exhausted"] == 1.0
    assert all(torch.count_nonzero(v) == 0 for v in update.delta.values())
    assert after["epsilon"] == eps[1]        # nothing was spent
    rows = runner.evaluate(params, 3)
    assert any(r["metric"] == "ndcg@10" for r in rows)
