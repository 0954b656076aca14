"""Non-neural baselines scored with exactly the learners' evaluation protocol.

Each baseline produces one (users, n_items) score matrix per client and population and
hands it to :func:`fedmeta.eval.protocol.rank_users`, the function that ranks the learners'
scores: the same users, the same targets, the same excluded items (the user's support and
other targets), the same pessimistic ties. Rows come out in the learners' format (one per
population, stage, metric; ``stage`` both ``before`` and ``after`` with the same value,
since a baseline has no adaptation step), so they go through the same recorder and summary.

What each population's baseline may use, mirroring what the learners see:

* **warm** users (training users of a training client): the client's training data, which
  holds their own history minus the held-out last ``n_test`` items; each is scored from
  that history (the support set of ``warm_eval``, as the learners adapt on it).
* **cold** users (held out inside a training client): the client's *training* users'
  interactions for the model (never another cold user's), and only the user's own
  k-shot support for scoring.
* **new-client** users: a new client has no training users of its own, so the model comes
  from the training clients of the same domain, pooled, as popularity counts do; each user
  is scored from their own k-shot support only. (Pooling across clients is what a learner's
  meta-parameters carry to a new client too; a deployed new client would need those
  clients' item statistics, which is the baseline's privilege, not the learners'.)

Training data is always ``train.support | train.query`` of the clients' training tasks:
the histories the learners train on, without any evaluation target. Histories are
de-duplicated, so every interaction matrix is binary.

Baselines:

``popularity``
    training interaction counts over the domain's training clients.
``item-knn`` (Sarwar et al. 2001; Deshpande & Karypis 2004)
    cosine similarity between item columns of the binary interaction matrix, with a
    shrinkage term in the denominator (``c_ij / (|i| |j| + shrink)``) that pulls down
    similarities resting on few co-occurrences; each item keeps its ``k`` most similar
    items, and a user's score for item ``j`` is the sum over the items ``i`` of their
    history of ``sim_k(i, j)``.
``ease`` (Steck 2019)
    the closed-form item-item model ``B = argmin ||X - XB||^2 + lambda ||B||^2`` with a
    zero diagonal: ``P = (X'X + lambda I)^-1``, ``B_ij = -P_ij / P_jj``; score = ``x_u B``.
    It is a dense item x item inverse, so it is refused above :data:`EASE_MAX_ITEMS`.

The hyper-parameters are fixed defaults chosen before looking at any evaluation number
(``k = 100``, ``shrink = 10``, ``lambda = 100``), not tuned on the evaluation users.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedmeta.data.tasks import ClientTasks, TaskTensors
from fedmeta.eval.protocol import rank_users

KNN_NEIGHBOURS = 100
KNN_SHRINK = 10.0
EASE_LAMBDA = 100.0
#: an n x n float64 inverse: 5,000 items is 200 MB per matrix and seconds of work; 20,000
#: would be 3.2 GB and minutes per client, which this machine class cannot spare
EASE_MAX_ITEMS = 5000
_ROW_CHUNK = 1024            # item rows of the similarity matrix computed at once

BASELINES = ("popularity", "item-knn", "ease")

Scorer = Callable[[TaskTensors], torch.Tensor]


class CatalogueTooLarge(ValueError):
    """A dense baseline was asked for on a catalogue it cannot hold."""


# ---- the data a baseline may read --------------------------------------------------------
def interaction_matrix(tasks: TaskTensors, n_items: int) -> torch.Tensor:
    """(users, n_items) binary matrix of the training histories (support and query)."""
    x = torch.zeros(len(tasks), n_items)
    mask = (tasks.support | tasks.query) & (tasks.targets < n_items)
    rows = torch.arange(len(tasks)).unsqueeze(1).expand_as(tasks.targets)
    x[rows[mask], tasks.targets[mask]] = 1.0
    return x


def history_matrix(tasks: TaskTensors, n_items: int) -> torch.Tensor:
    """(users, n_items) binary matrix of each evaluated user's support: the history the
    learners adapt on and read at evaluation (k-shot for cold and new-client users)."""
    x = torch.zeros(len(tasks), n_items)
    mask = tasks.support & (tasks.targets < n_items)
    rows = torch.arange(len(tasks)).unsqueeze(1).expand_as(tasks.targets)
    x[rows[mask], tasks.targets[mask]] = 1.0
    return x


def _training_pools(clients: list[ClientTasks]) -> dict[str, torch.Tensor]:
    """Per domain: the training clients' interaction matrices stacked (for new clients)."""
    pools: dict[str, list[torch.Tensor]] = {}
    for c in clients:
        if not c.partition.new_client:
            pools.setdefault(c.catalog.domain, []).append(interaction_matrix(c.train,
                                                                             c.catalog.n_items))
    return {d: torch.cat(xs) for d, xs in pools.items()}


# ---- the models ----------------------------------------------------------------------------
def item_knn(x: torch.Tensor, k: int = KNN_NEIGHBOURS, shrink: float = KNN_SHRINK) -> torch.Tensor:
    """Sparse (n_items, n_items) matrix: row ``i`` holds ``i``'s ``k`` most similar items.

    Similarity is the shrunk cosine ``c_ij / (sqrt(n_i n_j) + shrink)`` of binary columns
    (``c_ij`` co-occurrences, ``n_i`` users of ``i``); an item is not its own neighbour and
    zero similarities are dropped. Rows are computed in chunks, so memory is
    ``users x items`` plus ``chunk x items``, never ``items x items`` dense.
    """
    if k < 1:
        raise ValueError(f"k: the number of neighbours must be >= 1, got {k!r}")
    if shrink < 0:
        raise ValueError(f"shrink: must be >= 0, got {shrink!r}")
    n_items = x.shape[1]
    norms = x.sum(0).sqrt()
    keep = min(k, max(n_items - 1, 1))
    rows, cols, vals = [], [], []
    for start in range(0, n_items, _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, n_items)
        co = x[:, start:stop].T @ x                               # (chunk, n_items)
        sim = co / (norms[start:stop, None] * norms[None, :] + shrink).clamp(min=1e-12)
        sim[torch.arange(stop - start), torch.arange(start, stop)] = 0.0
        top = sim.topk(keep, dim=1)
        nz = top.values > 0
        rows.append((torch.arange(start, stop).unsqueeze(1).expand_as(nz))[nz])
        cols.append(top.indices[nz])
        vals.append(top.values[nz])
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(index, torch.cat(vals), (n_items, n_items),
                                   check_invariants=True).coalesce()


def knn_scores(sim: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """score(u, j) = sum over i in u's history of sim_k(i, j): ``history @ sim``."""
    return torch.sparse.mm(sim.t(), history.t()).t() if sim.is_sparse else history @ sim


def check_ease_size(n_items: int, max_items: int = EASE_MAX_ITEMS, what: str = "ease") -> None:
    """Refuse a catalogue the dense solve cannot hold, before any memory is spent on it."""
    if n_items > max_items:
        raise CatalogueTooLarge(
            f"{what}: the catalogue has {n_items} items, above the dense EASE limit of "
            f"{max_items} (an {n_items} x {n_items} float64 inverse needs "
            f"{n_items * n_items * 8 / 2**30:.1f} GiB per matrix); use item-knn, or leave "
            "ease out of --methods")


def ease(x: torch.Tensor, lam: float = EASE_LAMBDA, max_items: int = EASE_MAX_ITEMS,
         what: str = "ease") -> torch.Tensor:
    """Dense (n_items, n_items) EASE weights, zero diagonal, solved in float64."""
    n_items = x.shape[1]
    check_ease_size(n_items, max_items, what)
    if not lam > 0:
        raise ValueError(f"lam: the L2 weight must be > 0 (it makes X'X invertible), got {lam!r}")
    xd = x.double().numpy()
    gram = xd.T @ xd
    gram[np.diag_indices(n_items)] += lam
    p = np.linalg.inv(gram)
    b = p / (-np.diag(p))[None, :]
    b[np.diag_indices(n_items)] = 0.0
    return torch.from_numpy(b).float()


# ---- rows in the learners' format ---------------------------------------------------------
def _rows(clients: list[ClientTasks], seed: int,
          scorer_for: Callable[[ClientTasks], Scorer]) -> list[dict]:
    rows = []
    for c in clients:
        pops = [("new-client", c.cold_eval)] if c.partition.new_client else [
            ("warm", c.warm_eval), ("cold", c.cold_eval)]
        score = scorer_for(c)
        for population, tasks in pops:
            gen = torch.Generator().manual_seed(seed)
            scores = score(tasks) if len(tasks) else torch.zeros(0, c.catalog.n_items)
            for metric, value in rank_users(scores, tasks, c.catalog.n_items, gen).items():
                for phase in ("before", "after"):
                    rows.append({"population": population, "stage": phase,
                                 "domain": c.catalog.domain, "client": c.client_id,
                                 "metric": metric, "value": value})
    return rows


def _model_data(c: ClientTasks, pools: dict[str, torch.Tensor]) -> torch.Tensor:
    """A training client's own training users; a new client's domain pool (see above)."""
    if c.partition.new_client:
        if c.catalog.domain not in pools:
            raise ValueError(f"client {c.client_id}: new client of domain {c.catalog.domain!r}, "
                             "which has no training client to learn item statistics from")
        return pools[c.catalog.domain]
    return interaction_matrix(c.train, c.catalog.n_items)


def popularity_rows(clients: list[ClientTasks], seed: int) -> list[dict]:
    """Rank by how often the domain's training users interacted with each item."""
    counts = {d: x.sum(0) for d, x in _training_pools(clients).items()}

    def scorer(c: ClientTasks) -> Scorer:
        cnt = counts.get(c.catalog.domain, torch.zeros(c.catalog.n_items))
        return lambda tasks: cnt.expand(len(tasks), -1)
    return _rows(clients, seed, scorer)


def item_knn_rows(clients: list[ClientTasks], seed: int, k: int = KNN_NEIGHBOURS,
                  shrink: float = KNN_SHRINK) -> list[dict]:
    """Item-kNN per client (a new client: its domain's training clients pooled)."""
    pools = _training_pools(clients)

    def scorer(c: ClientTasks) -> Scorer:
        sim = item_knn(_model_data(c, pools), k, shrink)
        return lambda tasks: knn_scores(sim, history_matrix(tasks, c.catalog.n_items))
    return _rows(clients, seed, scorer)


def ease_rows(clients: list[ClientTasks], seed: int, lam: float = EASE_LAMBDA,
              max_items: int = EASE_MAX_ITEMS) -> list[dict]:
    """EASE per client (a new client: its domain's training clients pooled); refuses,
    before any solve, a federation with a catalogue above ``max_items``."""
    for c in clients:
        if c.catalog.n_items > max_items:
            check_ease_size(c.catalog.n_items, max_items,
                            f"ease: domain {c.catalog.domain!r} (client {c.client_id})")
    pools = _training_pools(clients)

    def scorer(c: ClientTasks) -> Scorer:
        b = ease(_model_data(c, pools), lam, max_items, f"ease: client {c.client_id}")
        return lambda tasks: history_matrix(tasks, c.catalog.n_items) @ b
    return _rows(clients, seed, scorer)


ROWS = {"popularity": popularity_rows, "item-knn": item_knn_rows, "ease": ease_rows}


def baseline_rows(name: str, clients: list[ClientTasks], seed: int) -> list[dict]:
    """The named baseline's metric rows, at its default hyper-parameters."""
    if name not in ROWS:
        raise ValueError(f"baseline: unknown baseline {name!r}; choose from {list(ROWS)}")
    return ROWS[name](clients, seed)
