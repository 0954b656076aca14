"""The training objective: cutting the item-token table to the rows a batch reads changes no
number, only the work; the full and the sampled (log-Q corrected) softmax."""

import pytest
import torch

from fedmeta.algorithms import ALGORITHMS, Objective
from fedmeta.algorithms.objective import TOKEN_TABLE, Cut
from fedmeta.config import ModelConfig
from fedmeta.data.tasks import Catalog
from fedmeta.eval.protocol import user_scores
from fedmeta.model.features import SharedItemIds, with_item_ids
from fedmeta.model.recommender import build_model, meta_parameters, private_parameters
from tests.helpers import algo_cfg, toy_client


def _setup(private: bool, loss: str = "full"):
    """``private``: with both ID tables (shared and private), so both ID columns pass the cut."""
    client = toy_client()
    rows = item_rows = 0
    if private:
        cat = client.catalog
        layout = SharedItemIds.for_catalogues({"a-first": 4, cat.domain: cat.n_items})
        client.catalog = Catalog(cat.domain, cat.items,
                                 with_item_ids(layout.with_ids(cat.feats, cat.domain)))
        rows, item_rows = cat.n_items + 3, layout.rows
    model = build_model(ModelConfig(size="tiny", loss=loss, item_ids="shared" if private else "none"),
                        10, seed=0, private_rows=rows, item_rows=item_rows)
    params = {**meta_parameters(model), **private_parameters(model)}
    if private:   # tables that are not zero, so that they matter
        for i, name in enumerate(k for k in params if k.startswith(("items.private", "items.ids"))):
            params[name] = torch.randn(params[name].shape,
                                       generator=torch.Generator().manual_seed(3 + i))
    batch = Objective(model).batch_for(client.train.subset(range(5)), client.catalog, 8,
                                       torch.Generator().manual_seed(1), torch.device("cpu"))
    return model, client, params, batch


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_the_cut_keeps_row_zero_and_only_rows_the_batch_reads(loss):
    model, _, params, batch = _setup(private=True, loss=loss)
    cut = Objective(model).compact(params, batch)
    width = batch["seq"].shape[-1] - 2                  # the shared and the private ID columns
    read = torch.unique(torch.cat([batch["seq"][..., :width].flatten(),
                                   batch["cand"][..., :width].flatten()]))
    assert cut.rows[0] == 0 and set(cut.rows.tolist()) == set(read.tolist()) | {0}
    assert len(cut.rows) < params[TOKEN_TABLE].shape[0] / 10
    assert torch.equal(cut.params[TOKEN_TABLE], params[TOKEN_TABLE][cut.rows])
    # the renumbered ids point at the same rows; the ID columns are left alone
    for key in ("seq", "cand"):
        assert cut.batch[key].shape == batch[key].shape
        assert torch.equal(cut.rows[cut.batch[key][..., :width]], batch[key][..., :width])
        assert torch.equal(cut.batch[key][..., width:], batch[key][..., width:])


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_directions_on_the_cut_equal_the_full_computation(name, private, loss):
    model, _, params, batch = _setup(private, loss)
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


# ---- the training loss: full softmax, sampled softmax with log-Q correction ---------------

def _loss_setup(loss="full"):
    client = toy_client()
    model = build_model(ModelConfig(size="tiny", loss=loss, item_ids="none"), 10, seed=0).double()
    params = {k: v.double() for k, v in meta_parameters(model).items()}
    return model, client, params


def _mean_loss(model, params, batch):
    with torch.no_grad():
        return Objective(model).batch_loss(params, batch, "support")


def test_full_batches_score_the_whole_catalogue_with_plain_cross_entropy():
    model, client, params = _loss_setup()
    tasks = client.train.subset(range(5))
    batch = Objective.batch(tasks, client.catalog, 8, torch.Generator().manual_seed(0),
                            torch.device("cpu"))
    n = client.catalog.n_items
    assert "neg" not in batch and batch["cand"].shape == (5, n, batch["seq"].shape[-1])
    assert batch["cand"].stride(0) == 0                    # one catalogue, not a copy per user
    # reference: logits against every item, torch's own cross-entropy per position
    with torch.no_grad():
        hidden, _ = model(batch["seq"], batch["attn"], batch["cand"][:, :0])
        items = model.encode_items(client.catalog.feats[:n])
        logits = hidden @ items.T
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                               batch["targets"].clamp(max=n - 1).flatten(),
                                               reduction="none").view(5, -1)
    m = batch["support"].double()
    expected = (ce * m).sum(1) / m.sum(1)
    torch.testing.assert_close(_mean_loss(model, params, batch), expected)


@pytest.mark.parametrize("proposal", ["uniform", "skewed"])
def test_log_q_corrected_sampled_loss_estimates_the_full_loss(proposal):
    """With many draws the corrected negatives stand for the whole catalogue; the
    uncorrected sampled loss (the old objective) is far off."""
    model, client, params = _loss_setup()
    tasks = client.train.subset(range(4))
    n = client.catalog.n_items
    q = None if proposal == "uniform" else torch.linspace(1.0, 10.0, n)
    full = _mean_loss(model, params, Objective.batch(
        tasks, client.catalog, 8, torch.Generator().manual_seed(0), torch.device("cpu")))
    sampled = Objective.batch(tasks, client.catalog, 20_000, torch.Generator().manual_seed(1),
                              torch.device("cpu"), loss="sampled", proposal=q)
    assert sampled["neg"].shape == (4, 20_000)
    est = _mean_loss(model, params, sampled)
    torch.testing.assert_close(est, full, atol=0.03, rtol=0.0)
    few = Objective.batch(tasks, client.catalog, 8, torch.Generator().manual_seed(1),
                          torch.device("cpu"), loss="sampled")
    uncorrected = _mean_loss(model, params, {**few, "logq": torch.zeros_like(few["logq"])})
    assert float((uncorrected - full).abs().min()) > 0.5


def test_popularity_proposal_draws_popular_items_more_often():
    client = toy_client()
    n = client.catalog.n_items
    q = torch.zeros(n)
    q[:3] = torch.tensor([1.0, 2.0, 7.0])
    batch = Objective.batch(client.train.subset(range(2)), client.catalog, 5000,
                            torch.Generator().manual_seed(0), torch.device("cpu"),
                            loss="sampled", proposal=q)
    counts = torch.bincount(batch["neg"].flatten(), minlength=n).double() / 10_000
    torch.testing.assert_close(counts[:3], torch.tensor([0.1, 0.2, 0.7], dtype=torch.double),
                               atol=0.02, rtol=0.0)
    assert counts[3:].sum() == 0
    torch.testing.assert_close(batch["logq"], torch.log(5000 * q[batch["neg"]] / q.sum()))
    with pytest.raises(ValueError, match="proposal"):
        Objective.batch(client.train.subset(range(2)), client.catalog, 5,
                        torch.Generator(), torch.device("cpu"), loss="sampled",
                        proposal=torch.ones(n + 1))


def test_large_catalogues_fall_back_to_the_sampled_loss(monkeypatch):
    import fedmeta.algorithms.objective as objective

    client = toy_client()
    monkeypatch.setattr(objective, "FULL_SOFTMAX_MAX_ITEMS", client.catalog.n_items - 1)
    batch = Objective.batch(client.train.subset(range(3)), client.catalog, 8,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch["neg"].shape == (3, 8) and batch["cand"].shape[1] == 10 + 8
    # a negatives budget at least the catalogue's size scores it whole: sampling would cost more
    whole = Objective.batch(client.train.subset(range(3)), client.catalog, client.catalog.n_items,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    assert "neg" not in whole and whole["cand"].shape[1] == client.catalog.n_items


def test_a_sampled_model_refuses_batches_built_for_the_full_loss():
    model, client, params = _loss_setup("sampled")
    obj = Objective(model)
    tasks = client.train.subset(range(3))
    own = obj.batch_for(tasks, client.catalog, 8, torch.Generator().manual_seed(0),
                        torch.device("cpu"))
    assert own["neg"].shape == (3, 8)
    assert torch.isfinite(_mean_loss(model, params, own)).all()
    full = Objective.batch(tasks, client.catalog, 8, torch.Generator().manual_seed(0),
                           torch.device("cpu"))
    with pytest.raises(ValueError, match="batch_for"):
        obj.batch_loss(params, full, "support")


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_vmapped_per_user_gradients_equal_one_user_at_a_time(loss):
    """What MAML's vmap(grad) and user-level DP rely on: user u's gradient is the gradient of
    user u's loss alone, whatever else is in the batch."""
    model, _, params, batch = _setup(private=True, loss=loss)    # with both ID tables
    model, obj = model.double(), Objective(model)
    params = {k: v.double() for k, v in params.items()}
    per_user = obj.per_user(lambda p, u: torch.func.grad(obj.loss)(p, u, "support"), params,
                            batch)
    for u in range(5):
        one = {k: v[u:u + 1] for k, v in batch.items()}
        leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        ref = torch.autograd.grad(obj.batch_loss(leaf, one, "support")[0], list(leaf.values()),
                                  allow_unused=True)
        for name, r in zip(leaf, ref):
            r = torch.zeros_like(params[name]) if r is None else r
            torch.testing.assert_close(per_user[name][u], r, rtol=1e-6, atol=1e-9)
