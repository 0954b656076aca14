"""The learned logit scale: a fresh model starts near the uniform guess, and the scale learns."""

import math

import pytest
import torch

from fedmeta.algorithms.objective import Objective
from fedmeta.config import ModelConfig
from fedmeta.data.synthetic import SyntheticConfig, generate
from fedmeta.data.tasks import Catalog, training_tasks, user_sequences
from fedmeta.model.features import HashFeaturizer, featurize_items
from fedmeta.model.recommender import build_model, meta_parameters

SCALE = "logit_scale.log.weight"
NEGATIVES = 64


@pytest.fixture(scope="module")
def synthetic_tasks():
    """One domain of the synthetic generator (correlated items, like real histories)."""
    data = generate(SyntheticConfig(seed=0, ecommerce_users=60, social_users=1,
                                    ecommerce_items=200, social_items=16)).domain("ecommerce")
    items = data.items.sort_values("item").reset_index(drop=True)
    feats = featurize_items(items, HashFeaturizer(4096, 12), data.attribute_columns)
    catalog = Catalog("ecommerce", items["item"].tolist(), feats)
    seqs = user_sequences(data.interactions, catalog)
    users = sorted(seqs)
    tasks = training_tasks(users, seqs, catalog, 30, 0.5, n_test=0)
    return tasks, catalog


def _loss(params, model, batch):
    with torch.no_grad():
        return float(Objective(model).batch_loss(params, {**batch, "all": batch["support"]
                                                           | batch["query"]}, "all").mean())


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fresh_model_starts_within_a_nat_of_the_uniform_loss(seed, loss, synthetic_tasks):
    """Uniform = ln(catalogue size): every item competes (full), or the log-Q corrected
    negatives stand for the whole catalogue (sampled)."""
    tasks, catalog = synthetic_tasks
    model = build_model(ModelConfig(size="tiny", loss=loss, item_ids="none"), 30, seed=seed)
    batch = Objective(model).batch_for(tasks.subset(range(32)), catalog, NEGATIVES,
                                       torch.Generator().manual_seed(seed), torch.device("cpu"))
    assert ("neg" in batch) == (loss == "sampled")
    params = meta_parameters(model)
    uniform = math.log(catalog.n_items)
    assert abs(_loss(params, model, batch) - uniform) < 1.0
    # what the scale is there for: the raw dot product starts several nats off
    raw = {**params, SCALE: torch.zeros_like(params[SCALE])}
    assert _loss(raw, model, batch) > uniform + 5


def test_the_scale_is_a_meta_parameter_that_moves(synthetic_tasks):
    from torch.func import grad

    tasks, catalog = synthetic_tasks
    model = build_model(ModelConfig(size="tiny", item_ids="none"), 30, seed=0)
    params = meta_parameters(model)
    assert SCALE in params
    assert torch.allclose(params[SCALE].exp(), torch.tensor(64 ** -0.5))
    batch = Objective.batch(tasks.subset(range(8)), catalog, NEGATIVES,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    g = grad(lambda p: Objective(model).batch_loss(p, batch, "support").mean())(params)
    assert float(g[SCALE].abs()) > 0
