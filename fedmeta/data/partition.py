"""Split one domain's users into client silos (organisations or devices).

A client is a set of users whose data never leaves it. Inside each training client a share
of users is held out as *cold-start* users (evaluated after adapting on a few of their own
interactions), and a few whole clients are held out as *new clients* (never trained, every
user evaluated), because generalising to a new user of a known organisation and to an
organisation the federation has never seen are different questions.

Schemes (the user-to-client assignment is delegated to ``flwr_datasets`` partitioners run
over a tiny table with one row per user, so the splits match what Flower users know):

``iid``
    :class:`~flwr_datasets.partitioner.IidPartitioner` over a seeded shuffle of the users
    (the partitioner itself cuts contiguous shards, so the shuffle is what makes it random).
``dirichlet``
    :class:`~flwr_datasets.partitioner.DirichletPartitioner` over a per-user label (a user
    group, a dominant category...): small ``alpha`` gives each client a few labels only.
    ``min_partition_size=min_users`` and ``self_balancing=True`` keep every client usable
    without flattening the label skew.
``size``
    :class:`~flwr_datasets.partitioner.LinearPartitioner`: client ``i`` gets a share of
    users proportional to ``i + 1``. The exponential variant was rejected because its
    smallest clients are empty for any realistic number of clients (with 10 clients the
    first one would get 0.006 % of the users).
``user``
    Cross-device: every user is its own client and ``n_clients`` is ignored. A one-user
    client cannot hold out a cold user, so cold-start users are whole held-out clients:
    ``max(new_clients, round(cold_fraction * n_users))`` clients are marked new, which
    honours both settings as lower bounds.

All randomness flows from ``seed``, and users are sorted first, so the split depends only on
the set of users and the arguments, never on the order the users were listed in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "size", "user")


@dataclass(frozen=True)
class ClientPartition:
    """One client silo of one domain."""

    client_id: str                  # f"{domain}-{index}"
    domain: str
    train_users: tuple[str, ...]    # warm users: take part in training
    cold_users: tuple[str, ...]     # held out inside the client, evaluated as cold-start users
    new_client: bool                # never trained: all its users are evaluated as new-client users

    @property
    def users(self) -> tuple[str, ...]:
        return self.train_users + self.cold_users


def _rng(seed: int, stage: int) -> np.random.Generator:
    """Independent stream per stage, so changing one stage never reshuffles another."""
    return np.random.default_rng([seed, stage])


def _unique_users(users: pd.Series | Sequence[str]) -> list[str]:
    values = [str(u) for u in (users.tolist() if isinstance(users, pd.Series) else list(users))]
    unique = sorted(set(values))
    if len(unique) < len(values):
        log.info("users: %d repeated entries ignored (%d distinct users)",
                 len(values) - len(unique), len(unique))
    return unique


def _user_labels(users: list[str], labels: pd.Series | None) -> list[str]:
    if labels is None:
        raise ValueError("labels: scheme='dirichlet' needs a per-user label Series "
                         "(indexed by user) to skew on")
    if not isinstance(labels, pd.Series):
        raise ValueError(f"labels: expected a pandas Series indexed by user, got "
                         f"{type(labels).__name__}")
    labels = labels.copy()
    labels.index = labels.index.astype(str)
    if labels.index.has_duplicates:
        dup = labels.index[labels.index.duplicated()][0]
        raise ValueError(f"labels: user {dup!r} has more than one label")
    mapped = pd.Series(users, dtype=object).map(labels)
    missing = mapped.isna()
    if missing.any():
        examples = [users[i] for i in np.flatnonzero(missing.to_numpy())[:5]]
        raise ValueError(f"labels: {int(missing.sum())} of {len(users)} users have no label "
                         f"(e.g. {examples})")
    return mapped.astype(str).tolist()


def _flwr_groups(users: list[str], labels: list[str] | None, scheme: str, n_clients: int,
                 alpha: float, min_users: int, seed: int) -> list[list[str]]:
    """Run the flwr_datasets partitioner for ``scheme`` over a one-row-per-user table."""
    import datasets
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           LinearPartitioner)

    order = _rng(seed, 0).permutation(len(users))
    table = {"user": [users[i] for i in order]}
    if labels is not None:
        table["label"] = [labels[i] for i in order]
    dataset = datasets.Dataset.from_dict(table)

    def run(partitioner) -> list[list[str]]:
        partitioner.dataset = dataset
        return [list(partitioner.load_partition(i)["user"]) for i in range(n_clients)]

    if scheme == "iid":
        return run(IidPartitioner(n_clients))
    if scheme == "size":
        return run(LinearPartitioner(n_clients))

    def dirichlet(min_size: int) -> list[list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = run(DirichletPartitioner(n_clients, "label", float(alpha),
                                              min_partition_size=min_size,
                                              self_balancing=True, shuffle=True, seed=seed))
        if caught:
            log.info("dirichlet: %d resamples to reach %d users per client", len(caught),
                     min_size)
        return groups

    try:
        return dirichlet(min_users)
    except ValueError as err:
        log.warning("dirichlet (alpha=%s) could not give every client %d users (%s); "
                    "topping small clients up from the largest instead", alpha, min_users, err)
        return dirichlet(0)


def _top_up(groups: list[list[str]], min_users: int, seed: int) -> list[list[str]]:
    """Move random users from the largest client to clients below ``min_users``."""
    rng = _rng(seed, 1)
    groups = [list(g) for g in groups]
    moved = 0
    while True:
        sizes = [len(g) for g in groups]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_users:
            break
        big = int(np.argmax(sizes))
        groups[small].append(groups[big].pop(int(rng.integers(sizes[big]))))
        moved += 1
    if moved:
        log.info("moved %d users into clients smaller than %d users", moved, min_users)
    return groups


def _split_cold(group: list[str], cold_fraction: float, rng: np.random.Generator
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, cold): a ``cold_fraction`` share, at least one user and never all of them."""
    n = len(group)
    n_cold = 0
    if cold_fraction > 0 and n >= 2:
        n_cold = min(n - 1, max(1, round(cold_fraction * n)))
    cold = set(rng.choice(n, size=n_cold, replace=False).tolist()) if n_cold else set()
    train = tuple(sorted(u for i, u in enumerate(group) if i not in cold))
    return train, tuple(sorted(group[i] for i in cold))


def partition_domain(users: pd.Series | list[str], domain: str, n_clients: int,
                     scheme: str = "iid", alpha: float = 0.5, labels: pd.Series | None = None,
                     cold_fraction: float = 0.2, new_clients: int = 0, min_users: int = 2,
                     seed: int = 0) -> list[ClientPartition]:
    """Clients of one domain; every user lands in exactly one of them.

    ``labels`` (scheme ``dirichlet`` only) is a Series mapping each user to its label.
    After partitioning, clients are put in a seeded random order (so the size scheme's
    largest client is not always last); the last ``new_clients`` are marked new and all
    their users are cold users. In the other clients a seeded ``cold_fraction`` of users
    (at least one when the client has two or more users and ``cold_fraction > 0``) is
    held out as cold-start users.
    """
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients: must be an int >= 1, got {n_clients!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; valid schemes: {list(SCHEMES)}")
    if not alpha > 0:
        raise ValueError(f"alpha: the Dirichlet concentration must be > 0, got {alpha!r}")
    if not 0 <= cold_fraction < 1:
        raise ValueError(f"cold_fraction: must be in [0, 1), got {cold_fraction!r}")
    if not isinstance(new_clients, int) or new_clients < 0:
        raise ValueError(f"new_clients: must be an int >= 0, got {new_clients!r}")
    if not isinstance(min_users, int) or min_users < 1:
        raise ValueError(f"min_users: must be an int >= 1, got {min_users!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    users = _unique_users(users)
    if not users:
        raise ValueError(f"users: domain {domain!r} has no users to partition")

    if scheme == "user":
        if n_clients != len(users):
            log.debug("scheme='user': n_clients=%d ignored, one client per user (%d)",
                      n_clients, len(users))
        order = _rng(seed, 0).permutation(len(users))
        groups = [[users[i]] for i in order]
        n_new = max(new_clients, round(cold_fraction * len(users)))
        if n_new >= len(groups):
            raise ValueError(f"new_clients: holding out {n_new} of {len(users)} single-user "
                             "clients (max of new_clients and cold_fraction * users) leaves "
                             "no client to train")
    else:
        if new_clients >= n_clients:
            raise ValueError(f"new_clients: {new_clients} of n_clients={n_clients} leaves no "
                             "client to train")
        if len(users) < n_clients * min_users:
            raise ValueError(f"n_clients: {len(users)} users in domain {domain!r} cannot fill "
                             f"{n_clients} clients with at least min_users={min_users} each")
        user_labels = _user_labels(users, labels) if scheme == "dirichlet" else None
        groups = _flwr_groups(users, user_labels, scheme, n_clients, alpha, min_users, seed)
        groups = _top_up(groups, min_users, seed)
        order = _rng(seed, 2).permutation(len(groups))
        groups = [groups[i] for i in order]
        n_new = new_clients

    placed = sum(len(g) for g in groups)
    if placed != len(users) or len({u for g in groups for u in g}) != len(users):
        raise RuntimeError(f"partitioning domain {domain!r} placed {placed} users, "
                           f"expected each of {len(users)} exactly once")
    cold_rng = _rng(seed, 3)
    parts = []
    for index, group in enumerate(groups):
        new = index >= len(groups) - n_new
        if new:
            train, cold = (), tuple(sorted(group))
        else:
            train, cold = _split_cold(group, cold_fraction, cold_rng)
        parts.append(ClientPartition(f"{domain}-{index}", domain, train, cold, new))
    log.info("domain %s: %d users -> %d clients (scheme=%s, %d new), %d warm / %d cold users",
             domain, len(users), len(parts), scheme, n_new,
             sum(len(p.train_users) for p in parts), sum(len(p.cold_users) for p in parts))
    return parts
