"""Cutting the item-token table to the rows a batch reads changes no number, only the work."""

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS, Objective
from fedmeta.algorithms.objective import TOKEN_TABLE, Cut
from fedmeta.config import ModelConfig
from fedmeta.data.tasks import Catalog
from fedmeta.eval.protocol import user_scores
from fedmeta.model.features import with_item_ids
from fedmeta.model.recommender import build_model, meta_parameters, private_parameters
from tests.helpers import algo_cfg, toy_client


def _setup(private: bool):
    client = toy_client()
    rows = 0
    if private:
        cat = client.catalog
        client.catalog = Catalog(cat.domain, cat.items, with_item_ids(cat.feats))
        rows = cat.n_items + 3
    model = build_model(ModelConfig(size="tiny"), 10, seed=0, private_rows=rows)
    params = {**meta_parameters(model), **private_parameters(model)}
    if private:   # a table that is not zero, so that it matters
        name = next(k for k in params if k.startswith("items.private"))
        params[name] = torch.randn(params[name].shape, generator=torch.Generator().manual_seed(3))
    batch = Objective.batch(client.train.subset(range(5)), client.catalog, 8,
                            torch.Generator().manual_seed(1), torch.device("cpu"))
    return model, client, params, batch


def test_the_cut_keeps_row_zero_and_only_rows_the_batch_reads():
    model, _, params, batch = _setup(private=True)
    cut = Objective(model).compact(params, batch)
    width = batch["seq"].shape[-1] - 1
    read = torch.unique(torch.cat([batch["seq"][..., :width].flatten(),
                                   batch["cand"][..., :width].flatten()]))
    assert cut.rows[0] == 0 and set(cut.rows.tolist()) == set(read.tolist()) | {0}
    assert len(cut.rows) < params[TOKEN_TABLE].shape[0] / 10
    assert torch.equal(cut.params[TOKEN_TABLE], params[TOKEN_TABLE][cut.rows])
    # the renumbered ids point at the same rows; the private id column is left alone
    assert torch.equal(cut.rows[cut.batch["seq"][..., :width]], batch["seq"][..., :width])
    assert torch.equal(cut.batch["cand"][..., -1], batch["cand"][..., -1])


@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_directions_on_the_cut_equal_the_full_computation(name, private):
    model, _, params, batch = _setup(private)
    extra = {"variant": "hf"} if name == "perfedavg" else {}
    algo = ALGORITHMS[name](algo_cfg(name=name, **extra), Objective(model))
    full, cut = algo.user_updates(params, batch), algo.directions(params, batch)
    assert set(full) == set(cut)
    for k in full:
        assert cut[k].shape == full[k].shape
        torch.testing.assert_close(cut[k], full[k], rtol=1e-5, atol=1e-7)
    # the table's gradient really is non-zero on the rows read, and zero elsewhere
    g = cut[TOKEN_TABLE].abs().sum((0, 2))
    read = Objective(model).compact(params, batch).rows
    assert (g[read[1:]] > 0).any() and not g[~torch.isin(torch.arange(len(g)), read)].any()


@pytest.mark.parametrize("steps", [0, 2])
def test_evaluation_scores_on_the_cut_equal_the_full_computation(steps, monkeypatch):
    model, client, params, _ = _setup(private=True)
    algo = ALGORITHMS["maml"](algo_cfg(name="maml"), Objective(model))
    tasks = client.train.subset(range(6))
    cut = user_scores(algo, params, tasks, client, steps, torch.Generator().manual_seed(0),
                      torch.device("cpu"))
    # the same evaluation with nothing cut
    monkeypatch.setattr(Objective, "compact",
                        lambda self, p, b, catalog=None: Cut(p, b, None, catalog))
    full = user_scores(algo, params, tasks, client, steps, torch.Generator().manual_seed(0),
                       torch.device("cpu"))
    assert cut.shape == (6, client.catalog.n_items)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
