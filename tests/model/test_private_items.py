"""The per-client private item-ID table: off by default, zero at start, trained, never sent,
and clipped with everything else under user-level DP."""

import pytest
import torch

from fedmeta.algorithms import FOMAML, FedAvg, Objective
from fedmeta.config import LocalDPConfig, ModelConfig
from fedmeta.data.tasks import Catalog
from fedmeta.model.features import with_item_ids
from fedmeta.model.recommender import PRIVATE_PREFIX, build_model, meta_parameters, \
    private_parameters
from fedmeta.privacy.accounting import UserLevelAccountant
from fedmeta.privacy.local import PrivateStep, opacus_hooks_grads
from tests.helpers import algo_cfg, toy_client

NAME = PRIVATE_PREFIX + "weight"


def _private_client(seed=0):
    client = toy_client(seed=seed)
    cat = client.catalog
    client.catalog = Catalog(cat.domain, cat.items, with_item_ids(cat.feats))
    return client


def _models():
    plain = build_model(ModelConfig(size="tiny", item_ids="none"), 10, seed=0)
    rows = _private_client().catalog.n_items + 3
    private = build_model(ModelConfig(size="tiny", item_ids="none"), 10, seed=0, private_rows=rows)
    return plain, private


def test_id_column_gives_pad_no_id_and_every_other_row_its_own():
    feats = torch.zeros(5, 2, dtype=torch.long)          # 3 items, PAD, BOS
    ids = with_item_ids(feats)[:, -1].tolist()
    assert ids == [1, 2, 3, 0, 5]


def test_table_is_not_a_meta_parameter_and_changes_no_shared_weight():
    plain, private = _models()
    shared, own = meta_parameters(private), private_parameters(private)
    assert set(own) == {NAME} and NAME not in shared
    assert set(shared) == set(meta_parameters(plain))
    for k, v in meta_parameters(plain).items():            # same RNG draws with or without it
        assert torch.equal(v, shared[k]), k
    assert torch.count_nonzero(own[NAME]) == 0


def test_a_zero_table_scores_exactly_like_the_shared_model():
    plain, private = _models()
    client, with_ids = toy_client(), _private_client()
    gen = torch.Generator().manual_seed(0)
    a = Objective.batch(client.train, client.catalog, 8, gen, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    b = Objective.batch(with_ids.train, with_ids.catalog, 8, gen, torch.device("cpu"))
    la = Objective(plain).batch_loss(meta_parameters(plain), a, "query")
    lb = Objective(private).batch_loss({**meta_parameters(private), **private_parameters(private)},
                                       b, "query")
    assert torch.allclose(la, lb, atol=1e-6)


def _identical_items_client():
    """Items that attributes cannot tell apart (one shared token), users who favour five of
    them: only an item-ID table can learn which."""
    from fedmeta.data.partition import ClientPartition
    from fedmeta.data.tasks import ClientTasks, training_tasks

    n_items = 30
    feats = torch.zeros(n_items + 2, 4, dtype=torch.long)
    feats[:n_items, 0] = 7
    feats[n_items + 1, 0] = 1
    cat = Catalog("toy", [f"i{j}" for j in range(n_items)], with_item_ids(feats))
    gen = torch.Generator().manual_seed(0)
    seqs = {f"u{u}": torch.randperm(5, generator=gen).tolist()
            + torch.randint(5, n_items, (2,), generator=gen).tolist() for u in range(12)}
    part = ClientPartition("toy-0", "toy", tuple(sorted(seqs)), (), False)
    train = training_tasks(sorted(seqs), seqs, cat, 10, 0.5, n_test=0)
    return ClientTasks(part, cat, train, train.subset([]), train.subset([]))


def test_client_update_trains_the_table_but_sends_only_meta_parameters():
    _, model = _models()
    client = _identical_items_client()
    algo = FedAvg(algo_cfg(local_steps=10, local_lr=0.1, local_optimizer="sgd",
                           users_per_step=12), Objective(model))
    params, own = meta_parameters(model), private_parameters(model)
    update = algo.client_update(params, client, torch.Generator().manual_seed(0), private=own)
    assert set(update.delta) == set(params)
    assert set(update.private) == {NAME}
    table = update.private[NAME]
    touched = torch.nonzero(table.abs().sum(1)).flatten().tolist()
    assert touched and 0 not in touched                  # trained; the PAD id row never moves
    # at the client's new shared parameters, the trained table fits the client's users better
    # than a zero table: it learned what the shared item encoder cannot express
    local = {k: params[k] - update.delta[k] for k in params}
    batch = Objective.batch(client.train, client.catalog, 8, torch.Generator().manual_seed(5),
                            torch.device("cpu"))
    obj = Objective(model)
    with torch.no_grad():
        trained = obj.batch_loss({**local, NAME: table}, batch, "query").mean()
        zero = obj.batch_loss({**local, NAME: torch.zeros_like(table)}, batch, "query").mean()
    assert trained < zero
    favoured, others = table[1:6, -1].mean(), table[6:31, -1].mean()   # ids = index + 1
    assert favoured > others                             # the private bias found the five


def test_clashing_private_and_meta_names_fail_loudly():
    _, model = _models()
    algo = FedAvg(algo_cfg(), Objective(model))
    params = meta_parameters(model)
    name = next(iter(params))
    with pytest.raises(ValueError, match="also"):
        algo.client_update(params, _private_client(), torch.Generator().manual_seed(0),
                           private={name: params[name]})


@pytest.mark.parametrize("algorithm", [FedAvg, FOMAML])
def test_dp_clips_each_user_over_meta_and_private_tensors_jointly(algorithm):
    _, model = _models()
    client = _private_client()
    algo = algorithm(algo_cfg(), Objective(model))
    params = {**meta_parameters(model), **private_parameters(model)}
    gen = torch.Generator().manual_seed(1)
    batch = Objective.batch(client.train.subset(range(6)), client.catalog, 8, gen,
                            torch.device("cpu"))
    per_user = algo.user_updates(params, batch)
    assert set(per_user) == set(params)
    assert per_user[NAME].abs().sum() > 0                 # the table does get gradient
    clip = 1e-3
    dp = LocalDPConfig(enabled=True, noise_multiplier=0.0, max_grad_norm=clip)
    step = PrivateStep(dp, 12, 0.5, 0.0, torch.Generator().manual_seed(0),
                       UserLevelAccountant("rdp", 1e-3))
    for u in range(6):
        raw = {k: v[u] for k, v in per_user.items()}
        joint = float(sum((v.double() ** 2).sum() for v in raw.values()) ** 0.5)
        assert joint > clip                               # so clipping really acts
        one = step.privatize({k: v[u:u + 1] for k, v in per_user.items()}, params)
        assert set(one) == set(params) and one[NAME].abs().sum() > 0
        for k, v in raw.items():   # one factor for all tensors: C / joint norm, then / batch
            assert torch.allclose(one[k], v * (clip / joint) / step.expected_batch,
                                  rtol=1e-4, atol=1e-12), k


def test_opacus_hooks_give_the_table_per_user_gradients_equal_to_torch_func():
    _, model = _models()
    client = _private_client()
    algo = FedAvg(algo_cfg(), Objective(model))
    params = {**meta_parameters(model), **private_parameters(model)}
    params[NAME] = 0.01 * torch.randn_like(params[NAME])
    gen = torch.Generator().manual_seed(2)
    batch = Objective.batch(client.train.subset(range(4)), client.catalog, 8, gen,
                            torch.device("cpu"))
    hooks = opacus_hooks_grads(algo, params, batch)
    func = algo.user_updates(params, batch)
    assert set(hooks) == set(func) == set(params)
    assert torch.allclose(hooks[NAME], func[NAME], atol=1e-5)

