import logging
import random

import numpy as np
import pandas as pd
import pytest

from fedmeta.data.partition import ClientPartition, partition_domain

USERS = [f"u{i:03d}" for i in range(120)]
LABELS = pd.Series({u: f"g{i % 6}" for i, u in enumerate(USERS)})


def _run(scheme, **kw):
    kw.setdefault("n_clients", 4)
    if scheme == "dirichlet":
        kw.setdefault("labels", LABELS)
    return partition_domain(kw.pop("users", USERS), "shop", scheme=scheme, **kw)


def _label_imbalance(parts: list[ClientPartition], labels: pd.Series) -> float:
    """Mean total-variation distance between each client's label mix and the global mix."""
    glob = labels.value_counts(normalize=True)
    tv = []
    for p in parts:
        mix = labels[list(p.users)].value_counts(normalize=True).reindex(glob.index, fill_value=0)
        tv.append(0.5 * float(np.abs(mix - glob).sum()))
    return float(np.mean(tv))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "size", "user"])
def test_every_user_in_exactly_one_client(scheme):
    parts = _run(scheme, new_clients=1, cold_fraction=0.25)
    placed = [u for p in parts for u in p.train_users + p.cold_users]
    assert sorted(placed) == USERS                       # covered, nothing dropped or repeated
    assert [p.client_id for p in parts] == [f"shop-{i}" for i in range(len(parts))]
    assert all(p.domain == "shop" for p in parts)
    assert sum(p.new_client for p in parts) >= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "size", "user"])
def test_deterministic_and_independent_of_input_order(scheme):
    first = _run(scheme, new_clients=1, seed=3)
    shuffled = USERS[:]
    random.Random(0).shuffle(shuffled)
    assert _run(scheme, users=pd.Series(shuffled), new_clients=1, seed=3) == first
    assert _run(scheme, new_clients=1, seed=4) != first


def test_iid_clients_are_random_not_contiguous_blocks():
    for p in _run("iid", cold_fraction=0):
        first = USERS.index(p.train_users[0])
        assert list(p.train_users) != USERS[first:first + len(p.train_users)]


def test_dirichlet_skews_labels_more_than_iid():
    skew = np.mean([_label_imbalance(_run("dirichlet", alpha=0.1, seed=s), LABELS)
                    for s in range(3)])
    iid = np.mean([_label_imbalance(_run("iid", seed=s), LABELS) for s in range(3)])
    assert skew > 3 * iid and skew > 0.3, (skew, iid)


def test_dirichlet_keeps_min_users_even_when_resampling_gives_up(caplog):
    users = [f"v{i}" for i in range(40)]
    labels = pd.Series({u: f"g{i % 2}" for i, u in enumerate(users)})
    with caplog.at_level(logging.WARNING, logger="fedmeta.data.partition"):
        parts = partition_domain(users, "shop", 4, scheme="dirichlet", alpha=0.01,
                                 labels=labels, min_users=8, cold_fraction=0)
    assert "topping small clients up" in caplog.text
    assert min(len(p.users) for p in parts) >= 8
    assert sorted(u for p in parts for u in p.users) == sorted(users)


def test_size_scheme_is_unequal_and_respects_min_users():
    sizes = sorted(len(p.users) for p in _run("size", n_clients=5))
    assert sizes[-1] >= 3 * sizes[0], sizes                # linear shares 1:2:3:4:5
    small = partition_domain(USERS[:20], "shop", 5, scheme="size", min_users=3)
    assert min(len(p.users) for p in small) >= 3           # topped up from the largest client
    assert sum(len(p.users) for p in small) == 20


def test_new_clients_and_cold_users():
    parts = _run("iid", n_clients=5, new_clients=2, cold_fraction=0.2)
    new = [p for p in parts if p.new_client]
    assert [p.client_id for p in new] == ["shop-3", "shop-4"]
    for p in new:
        assert p.train_users == () and len(p.cold_users) == 24
    for p in parts[:3]:
        assert len(p.cold_users) == round(0.2 * 24) and len(p.train_users) == 24 - 5
        assert not set(p.cold_users) & set(p.train_users)


def test_cold_users_at_least_one_never_all():
    parts = partition_domain(USERS[:6], "shop", 3, cold_fraction=0.01)
    assert all(len(p.cold_users) == 1 and len(p.train_users) == 1 for p in parts)
    parts = partition_domain(USERS[:6], "shop", 3, cold_fraction=0.9)
    assert all(len(p.train_users) == 1 for p in parts)
    parts = partition_domain(USERS[:6], "shop", 3, cold_fraction=0)
    assert all(p.cold_users == () for p in parts)


def test_cross_device_one_user_per_client():
    parts = _run("user", n_clients=3, new_clients=2, cold_fraction=0.1)   # n_clients ignored
    assert len(parts) == len(USERS)
    assert all(len(p.users) == 1 for p in parts)
    new = [p for p in parts if p.new_client]
    assert len(new) == 12                                  # max(2, round(0.1 * 120))
    assert all(p.train_users == () and len(p.cold_users) == 1 for p in new)
    assert all(len(p.train_users) == 1 and p.cold_users == () for p in parts if not p.new_client)
    assert sum(p.new_client for p in _run("user", new_clients=30, cold_fraction=0.1)) == 30


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_clients=0), "n_clients"),
    (dict(scheme="random"), "scheme"),
    (dict(alpha=0.0), "alpha"),
    (dict(cold_fraction=1.0), "cold_fraction"),
    (dict(cold_fraction=-0.1), "cold_fraction"),
    (dict(n_clients=61), "n_clients"),                     # 120 users < 61 * min_users=2
    (dict(new_clients=4), "new_clients"),
    (dict(scheme="user", new_clients=120), "new_clients"),
    (dict(scheme="dirichlet", labels=None), "labels"),
    (dict(scheme="dirichlet", labels=LABELS.iloc[:-3]), "labels"),
])
def test_errors_name_the_argument(kwargs, name):
    kwargs = {"scheme": "iid", **kwargs}
    scheme = kwargs.pop("scheme")
    with pytest.raises(ValueError, match=f"^{name}") as err:
        partition_domain(USERS, "shop", kwargs.pop("n_clients", 4), scheme=scheme, **kwargs)
    if name == "scheme":
        assert "dirichlet" in str(err.value) and "user" in str(err.value)
    if name == "labels" and kwargs["labels"] is not None:
        assert "3 of 120 users have no label" in str(err.value)
