"""Baselines: hand-computed item-kNN, EASE against a direct solve, the data each may read."""

import math

import numpy as np
import pytest
import torch

from fedmeta.config import ExperimentConfig
from fedmeta.data.partition import ClientPartition
from fedmeta.data.tasks import Catalog, ClientTasks, build_client_tasks, eval_tasks, training_tasks
from fedmeta.eval.baselines import (CatalogueTooLarge, ease, ease_rows, history_matrix,
                                    interaction_matrix, item_knn, item_knn_rows, knn_scores,
                                    popularity_rows)
from fedmeta.eval.protocol import popularity_rows as protocol_popularity_rows
from fedmeta.eval.protocol import rank_users
from fedmeta.runtime.results import Recorder, domain_table, write_outputs
from fedmeta.tools.compare import overall

N_ITEMS = 4
MAX_LEN = 10
# training users of client toy-0 (binary columns of items 0..3):
#   u1 {0, 1}   u2 {0, 1, 2}   u3 {2, 3}
# users per item n = [2, 2, 2, 1]; co-occurrences c01 = 2, c02 = c12 = c23 = 1, c03 = c13 = 0
TRAIN_0 = {"u1": [0, 1], "u2": [0, 1, 2], "u3": [2, 3]}
# training users of client toy-2: v1 {0, 3}, v2 {0, 3}
TRAIN_2 = {"v1": [0, 3], "v2": [0, 3]}


def catalog(n_items: int = N_ITEMS) -> Catalog:
    return Catalog("toy", [f"i{j}" for j in range(n_items)],
                   torch.zeros(n_items + 2, 4, dtype=torch.long))


def client(cid: str, train: dict, cold: dict, new: bool = False,
           cat: Catalog | None = None) -> ClientTasks:
    """A client whose cold (or new-client) users reveal all but their last item."""
    cat = cat or catalog()
    part = ClientPartition(cid, "toy", tuple(sorted(train)), tuple(sorted(cold)), new)
    tr = training_tasks(sorted(train), train, cat, MAX_LEN, 0.5, n_test=0)
    ev = eval_tasks(sorted(cold), cold, cat, MAX_LEN, lambda seq: len(seq) - 1, "cold")
    return ClientTasks(part, cat, tr, tr.subset([]), ev)


def metric(rows: list[dict], client_id: str, population: str, name: str) -> float:
    found = {r["value"] for r in rows if r["client"] == client_id and r["population"] == population
             and r["metric"] == name}
    assert len(found) == 1, found
    return found.pop()


def test_item_knn_similarities_by_hand():
    x = interaction_matrix(client("toy-0", TRAIN_0, {}).train, N_ITEMS)
    sim = item_knn(x, k=10, shrink=1.0).to_dense()
    # shrunk cosine c_ij / (sqrt(n_i n_j) + 1)
    want = torch.zeros(4, 4)
    want[0, 1] = want[1, 0] = 2 / (2 + 1)
    want[0, 2] = want[2, 0] = want[1, 2] = want[2, 1] = 1 / (2 + 1)
    want[2, 3] = want[3, 2] = 1 / (math.sqrt(2) + 1)
    assert torch.allclose(sim, want, atol=1e-6)
    # k = 1: each row keeps its single most similar item (row 2 ties 0 and 1 at 1/3 < 0.414)
    top1 = item_knn(x, k=1, shrink=1.0).to_dense()
    assert torch.count_nonzero(top1, dim=1).tolist() == [1, 1, 1, 1]
    assert top1[0, 1] == pytest.approx(2 / 3) and top1[2, 3] == pytest.approx(math.sqrt(2) - 1)
    # a user who revealed {0, 2} scores j by sim(0, j) + sim(2, j)
    hist = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    s = knn_scores(item_knn(x, k=10, shrink=1.0), hist)
    assert torch.allclose(s, torch.tensor([[1 / 3, 2 / 3 + 1 / 3, 1 / 3, math.sqrt(2) - 1]]),
                          atol=1e-6)


def test_item_knn_ranking_by_hand_and_top_k_matters():
    # cold user c1 reveals [0] and must find 2: scores 1 -> 2/3, 2 -> 1/3, 3 -> 0
    c = client("toy-0", TRAIN_0, {"c1": [0, 2]})
    rows = item_knn_rows([c], seed=0, k=10, shrink=1.0)
    assert metric(rows, "toy-0", "cold", "mrr") == pytest.approx(1 / 2)
    assert metric(rows, "toy-0", "cold", "ndcg@10") == pytest.approx(1 / math.log2(3))
    # with one neighbour, item 0 keeps only item 1: item 2 ties item 3 at 0 and ties count
    # against the target, so it ranks third
    rows = item_knn_rows([c], seed=0, k=1, shrink=1.0)
    assert metric(rows, "toy-0", "cold", "mrr") == pytest.approx(1 / 3)


def test_support_items_are_excluded_from_the_ranking():
    # c2 reveals [0, 1] and must find 2: items 0, 1 and 2 all score 2/3 (0 via 1, 1 via 0,
    # 2 via both at 1/3 each); were the support ranked, ties would put 2 third. Only item 3
    # (score 0) competes, so 2 is first.
    c = client("toy-0", TRAIN_0, {"c2": [0, 1, 2]})
    hist = history_matrix(c.cold_eval, N_ITEMS)
    assert hist.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    s = knn_scores(item_knn(interaction_matrix(c.train, N_ITEMS), 10, 1.0), hist)
    assert torch.allclose(s[0, :3], torch.full((3,), 2 / 3), atol=1e-6)
    rows = item_knn_rows([c], seed=0, k=10, shrink=1.0)
    assert metric(rows, "toy-0", "cold", "mrr") == 1.0
    assert metric(rows, "toy-0", "cold", "hr@5") == 1.0


def test_new_client_uses_its_domains_training_clients_pooled():
    # n1 (new client) reveals [0] and must find 3. Pooled over toy-0 and toy-2:
    # n = [4, 2, 2, 3]; sim(0,1) = 2/sqrt(8) = .707, sim(0,3) = 2/sqrt(12) = .577,
    # sim(0,2) = 1/sqrt(8) = .354 -> rank 2. (toy-0 alone: sim(0,3) = 0 -> rank 3;
    # toy-2 alone: sim(0,1) = 0 -> rank 1.)
    clients = [client("toy-0", TRAIN_0, {}), client("toy-2", TRAIN_2, {}),
               client("toy-1", {}, {"n1": [0, 3]}, new=True)]
    rows = item_knn_rows(clients, seed=0, k=10, shrink=0.0)
    assert metric(rows, "toy-1", "new-client", "mrr") == pytest.approx(1 / 2)
    # the training clients' own cold users see only their own client's training users
    own = [client("toy-0", TRAIN_0, {"c1": [0, 3]}), client("toy-2", TRAIN_2, {})]
    rows = item_knn_rows(own, seed=0, k=10, shrink=0.0)
    assert metric(rows, "toy-0", "cold", "mrr") == pytest.approx(1 / 3)


def test_no_training_matrix_holds_an_evaluation_target():
    """Warm users' held-out items and cold users never reach a baseline's training data."""
    gen = np.random.default_rng(0)
    cat = catalog(40)
    seqs = {f"u{i}": gen.permutation(40)[: 4 + i % 6].tolist() for i in range(30)}
    part = ClientPartition("toy-0", "toy", tuple(sorted(seqs)[:24]), tuple(sorted(seqs)[24:]),
                           False)
    c = build_client_tasks(part, seqs, cat, MAX_LEN, 0.5, n_test=2, k_shot=2)
    x = interaction_matrix(c.train, 40)
    row = {u: i for i, u in enumerate(c.train.users)}
    assert set(c.train.users) <= set(part.train_users)
    for u, targets in zip(c.warm_eval.users, c.warm_eval.eval_targets):
        assert x[row[u], targets].sum() == 0, u
        # the warm user is scored from the same history it trains on
        one = c.warm_eval.subset([c.warm_eval.users.index(u)])
        assert history_matrix(one, 40)[0].equal(x[row[u]])
    assert not set(c.cold_eval.users) & set(c.train.users)


def _ridge_columns(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE solved the long way: column j is the ridge regression of item j on the others."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        a = x[:, others]
        b[others, j] = np.linalg.solve(a.T @ a + lam * np.eye(n - 1), a.T @ x[:, j])
    return b


def test_ease_matches_a_direct_solve():
    gen = np.random.default_rng(3)
    x = (gen.random((30, 12)) < 0.3).astype(np.float64)
    got = ease(torch.from_numpy(x).float(), lam=3.0).double().numpy()
    np.testing.assert_allclose(got, _ridge_columns(x, 3.0), atol=1e-5)
    assert np.all(np.diag(got) == 0)


def test_ease_rows_rank_the_direct_solutions_scores():
    clients = [client("toy-0", TRAIN_0, {"c1": [0, 2], "c3": [1, 3]}), client("toy-2", TRAIN_2, {}),
               client("toy-1", {}, {"n1": [0, 3], "n2": [2, 1]}, new=True)]
    rows = ease_rows(clients, seed=0, lam=0.5)
    for c, population, train in [(clients[0], "cold", TRAIN_0),
                                 (clients[2], "new-client", {**TRAIN_0, **TRAIN_2})]:
        x = np.zeros((len(train), N_ITEMS))
        for u, items in enumerate(train.values()):
            x[u, items] = 1.0
        b = torch.from_numpy(_ridge_columns(x, 0.5)).float()
        scores = history_matrix(c.cold_eval, N_ITEMS) @ b
        want = rank_users(scores, c.cold_eval, N_ITEMS, torch.Generator().manual_seed(0))
        for name in ("mrr", "ndcg@10", "auc", "users"):
            assert metric(rows, c.client_id, population, name) == pytest.approx(want[name])


def test_ease_refuses_a_catalogue_above_its_limit():
    with pytest.raises(CatalogueTooLarge, match="6 items, above the dense EASE limit of 5"):
        ease(torch.zeros(3, 6), max_items=5)
    big = client("toy-0", TRAIN_0, {"c1": [0, 2]}, cat=catalog(7))
    with pytest.raises(CatalogueTooLarge, match=r"domain 'toy' \(client toy-0\)"):
        ease_rows([big], seed=0, max_items=6)
    with pytest.raises(ValueError, match="lam"):
        ease(torch.zeros(3, 4), lam=0.0)


def test_popularity_counts_by_hand_and_old_import_path_works():
    # domain counts over toy-0 and toy-2: item 0: 4, 1: 2, 2: 2, 3: 3.
    # n1 reveals 0 (excluded), seeks 3: 3 beats 1 and 2 -> rank 1
    clients = [client("toy-0", TRAIN_0, {}), client("toy-2", TRAIN_2, {}),
               client("toy-1", {}, {"n1": [0, 3], "n2": [3, 2]}, new=True)]
    rows = popularity_rows(clients, seed=0)
    # n2 reveals 3, seeks 2: item 0 (4) beats it, item 1 ties it (2) -> rank 3
    assert metric(rows, "toy-1", "new-client", "mrr") == pytest.approx((1 + 1 / 3) / 2)
    assert protocol_popularity_rows(clients, seed=0) == rows


def test_rows_parse_through_the_summary(tmp_path):
    clients = [client("toy-0", TRAIN_0, {"c1": [0, 2], "c2": [0, 1, 2]}),
               client("toy-2", TRAIN_2, {"c3": [3, 0]}),
               client("toy-1", {}, {"n1": [0, 3]}, new=True)]
    pop = popularity_rows(clients, seed=0)
    for rows in (item_knn_rows(clients, seed=0), ease_rows(clients, seed=0, lam=1.0)):
        # the learners' row format: same keys, same (population, stage, client, metric) cells
        assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(r)) for r in pop}
        assert ({(r["population"], r["stage"], r["client"], r["metric"]) for r in rows}
                == {(r["population"], r["stage"], r["client"], r["metric"]) for r in pop})
        rec = Recorder()
        rec.eval_rows([{**r, "round": 0} for r in rows])
        cfg = ExperimentConfig()
        cfg.runtime.plots = False
        summary = write_outputs(tmp_path, cfg, rec, {})
        cold = summary["final_metrics"]["toy"]["cold"]["after"]
        # user-weighted over toy-0 (2 users) and toy-2 (1 user)
        want = (2 * metric(rows, "toy-0", "cold", "mrr") + metric(rows, "toy-2", "cold", "mrr")) / 3
        assert cold["mrr"] == pytest.approx(want)
        assert overall(domain_table(rec.frame()))[("new-client", "mrr")] == pytest.approx(
            metric(rows, "toy-1", "new-client", "mrr"))


def test_bad_knn_settings_are_refused():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="k: the number of neighbours"):
        item_knn(x, k=0)
    with pytest.raises(ValueError, match="shrink"):
        item_knn(x, k=5, shrink=-1.0)
