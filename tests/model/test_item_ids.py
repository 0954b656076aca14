"""The shared item-ID table: one learned row per catalogue item of every domain, a
meta-parameter summed with the attribute/text encoding."""

import logging

import pytest
import torch
from opacus import GradSampleModule

from fedmeta.algorithms import FedAvg, Objective
from fedmeta.config import ConfigError, ModelConfig
from fedmeta.data.partition import ClientPartition
from fedmeta.data.tasks import Catalog, ClientTasks, training_tasks
from fedmeta.model.features import SharedItemIds, with_item_ids
from fedmeta.model.recommender import (build_model, meta_parameters, private_parameters,
                                      shared_item_rows)
from tests.helpers import algo_cfg, toy_client

NAME = "items.ids.weight"


def test_layout_is_row_zero_then_domains_in_name_order():
    layout = SharedItemIds.for_catalogues({"social": 3, "ecommerce": 2})
    assert layout.rows == 6 and dict(layout.offsets) == {"ecommerce": 1, "social": 3}
    feats = torch.zeros(3 + 2, 4, dtype=torch.long)               # 3 items, PAD, BOS
    assert layout.with_ids(feats, "social")[:, -1].tolist() == [3, 4, 5, 0, 0]
    assert layout.with_ids(torch.zeros(4, 4, dtype=torch.long), "ecommerce")[:, -1].tolist() \
        == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="sized for 3"):
        layout.with_ids(torch.zeros(6, 4, dtype=torch.long), "social")
    with pytest.raises(ValueError, match="not in the shared"):
        layout.with_ids(feats, "films")


def _client(seed=0, private=False):
    client = toy_client(seed=seed)
    cat = client.catalog
    layout = SharedItemIds.for_catalogues({"other": 7, "toy": cat.n_items})
    feats = layout.with_ids(cat.feats, "toy")
    if private:
        feats = with_item_ids(feats)
    client.catalog = Catalog(cat.domain, cat.items, feats)
    return client, layout.rows


def test_a_zero_table_scores_exactly_like_no_table_and_changes_no_other_weight():
    client, rows = _client()
    plain_client = toy_client()
    plain = build_model(ModelConfig(size="tiny", item_ids="none"), 10, seed=0)
    shared = build_model(ModelConfig(size="tiny"), 10, seed=0, item_rows=rows)
    p_plain, p_shared = meta_parameters(plain), meta_parameters(shared)
    assert set(p_shared) - set(p_plain) == {NAME}
    assert p_shared[NAME].shape == (rows, 65) and not p_shared[NAME].any()
    for k, v in p_plain.items():
        assert torch.equal(v, p_shared[k]), k
    a = Objective.batch(plain_client.train, plain_client.catalog, 8,
                        torch.Generator().manual_seed(0), torch.device("cpu"))
    b = Objective.batch(client.train, client.catalog, 8, torch.Generator().manual_seed(0),
                        torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(Objective(plain).batch_loss(p_plain, a, "query"),
                                   Objective(shared).batch_loss(p_shared, b, "query"))


def test_without_rows_the_shared_table_is_refused_not_dropped():
    with pytest.raises(ConfigError, match="item_rows"):
        build_model(ModelConfig(size="tiny"), 10, seed=0)
    with pytest.raises(ConfigError, match="catalogue sizes"):
        shared_item_rows(ModelConfig(size="tiny"), {})
    assert shared_item_rows(ModelConfig(size="tiny", item_ids="none"), None) == 0
    assert shared_item_rows(ModelConfig(size="tiny"), {"b": 3, "a": 2}) == 6
    assert NAME not in meta_parameters(build_model(ModelConfig(size="tiny", item_ids="none"), 10,
                                                   item_rows=50))


def test_bad_item_ids_names_its_key():
    with pytest.raises(ConfigError, match=r"^model\.item_ids: 'private'"):
        ModelConfig(item_ids="private")


def _look_alike_client(n_items=30):
    """Items whose features are identical (one shared token) and users who all favour the same
    five: the attribute encoder cannot tell them apart, an ID table can."""
    feats = torch.zeros(n_items + 2, 4, dtype=torch.long)
    feats[:n_items, 0] = 7
    feats[n_items + 1, 0] = 1
    layout = SharedItemIds.for_catalogues({"toy": n_items})
    cat = Catalog("toy", [f"i{j}" for j in range(n_items)], layout.with_ids(feats, "toy"))
    gen = torch.Generator().manual_seed(0)
    seqs = {f"u{u}": torch.randperm(5, generator=gen).tolist()
            + torch.randint(5, n_items, (2,), generator=gen).tolist() for u in range(12)}
    part = ClientPartition("toy-0", "toy", tuple(sorted(seqs)), (), False)
    train = training_tasks(sorted(seqs), seqs, cat, 10, 0.5, n_test=0)
    return ClientTasks(part, cat, train, train.subset([]), train.subset([])), layout.rows


def test_the_table_learns_what_features_cannot_say_and_is_sent():
    client, rows = _look_alike_client()
    model = build_model(ModelConfig(size="tiny"), 10, seed=0, item_rows=rows)
    algo = FedAvg(algo_cfg(local_steps=10, local_lr=0.1, local_optimizer="sgd",
                           users_per_step=12), Objective(model))
    params = meta_parameters(model)
    update = algo.client_update(params, client, torch.Generator().manual_seed(0))
    assert NAME in update.delta and update.delta[NAME].abs().sum() > 0     # a meta-parameter
    table = params[NAME] - update.delta[NAME]
    assert not table[0].any()                                  # row 0 ("no item") never moves
    batch = Objective.batch(client.train, client.catalog, 8, torch.Generator().manual_seed(5),
                            torch.device("cpu"))
    local = {k: params[k] - update.delta[k] for k in params}
    with torch.no_grad():
        trained = Objective(model).batch_loss(local, batch, "query").mean()
        zero = Objective(model).batch_loss({**local, NAME: torch.zeros_like(table)}, batch,
                                           "query").mean()
    assert trained < zero
    favoured, others = table[1:6, -1].mean(), table[6:31, -1].mean()     # rows = index + 1
    assert favoured > others


@pytest.mark.parametrize("private", [False, True])
def test_opacus_per_sample_gradients_cover_the_table_and_equal_single_users(private):
    client, rows = _client(private=private)
    model = build_model(ModelConfig(size="tiny"), 10, seed=0, item_rows=rows,
                        private_rows=client.catalog.n_items + 3 if private else 0).double()
    with torch.no_grad():        # non-zero tables, so that every gradient path is exercised
        for name, p in model.named_parameters():
            if name.startswith(("items.ids", "items.private")):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = Objective.batch(client.train.subset(range(3)), client.catalog, 6,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    hidden, cand = gsm(batch["seq"], batch["attn"], batch["cand"])
    Objective.nll(hidden, cand, batch, "support").mean().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    expected = {NAME} | ({"items.private.weight"} if private else set())
    assert expected <= set(samples) and samples[NAME][:, 1:].abs().sum() > 0
    for u in range(3):
        model.zero_grad()
        one = {k: v[u:u + 1] for k, v in batch.items()}
        hidden, cand = model(one["seq"], one["attn"], one["cand"])
        Objective.nll(hidden, cand, one, "support").sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(samples[name][u], p.grad, rtol=1e-6, atol=1e-9)


def test_shared_and_private_tables_read_their_own_columns():
    client, rows = _client(private=True)
    model = build_model(ModelConfig(size="tiny"), 10, seed=0, item_rows=rows,
                        private_rows=client.catalog.n_items + 3)
    assert model.items.id_columns == 2
    params = {**meta_parameters(model), **private_parameters(model)}
    feats = client.catalog.feats[:5]
    base = Objective(model)._items(params, feats)
    shared = dict(params)
    shared[NAME] = torch.zeros_like(shared[NAME])
    shared[NAME][feats[:, -2]] = 1.0                        # only the rows the items point at
    own = dict(params)
    own["items.private.weight"] = torch.zeros_like(own["items.private.weight"])
    own["items.private.weight"][feats[:, -1], -1] = 2.0
    with torch.no_grad():
        assert not torch.allclose(Objective(model)._items(shared, feats), base)
        torch.testing.assert_close(Objective(model)._items(own, feats)[:, -1], base[:, -1] + 2.0)
