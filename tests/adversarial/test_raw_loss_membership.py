"""Attack 7: membership inference from what a DP reply carries besides the noised update.

The attack. Only the update is noised. Anything else in the reply that depends on the
training users -- the raw training loss, the number of tasks used as the aggregation weight,
metrics of the training (warm) users -- is released exactly, with no DP at all: a server
compares the replies of two silos that differ by one user (or one silo across rounds) and
reads the difference off. The defence is that a DP node's reply is the same for both
neighbours except for the noised update.

Observed on the old code (bc7380d, ecommerce-0 under local DP): the reply metrics were
``num-examples`` = 36 (the silo's task count, as the aggregation weight),
``train_query_loss`` = 14.3169 (the sampled users' mean loss before the step, exact),
``epsilon``, ``noise_multiplier``, ``sample_rate`` = 0.1111 (= 4 / 36) and ``dp_steps``.

Now: the reply's metric keys are a subset of :data:`DP_REPLY_METRICS` (no loss), the weight
is 1, and evaluation replies carry no ``warm`` rows. A non-DP node of the same silo shows
what the checks catch: its reply has the raw loss, the task count as weight and warm rows.

Found by these tests and fixed: the DP reply carried ``sample_rate`` =
users_per_step / n and ``delta`` = 1 / (10 n) -- both the silo's exact number of training
users -- and ``epsilon``, a function of both. Neighbouring silos (one training user removed)
gave different values, so the server read n exactly (4 / 0.1111 = 36 against 4 / 0.1143 =
35), the very count the constant weight was meant to hide. (Under a target epsilon the
solved noise multiplier is a function of n as well; these tests run at a fixed sigma.) Now
q, delta and the noise's divisor follow the node's declared population
(``privacy.local.population``); a DP node without one refuses to create a budget.
"""

from __future__ import annotations

import math

import pytest

from fedmeta.runtime.node import DP_REPLY_METRICS
import wire
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"
#: functions of the silo's user count if q and delta were derived from it
COUNT_DERIVED = frozenset({"epsilon", "delta", "sample_rate", "noise_multiplier"})


@pytest.fixture(scope="module")
def neighbours(fed, tmp_path_factory):
    """(reply, eval rows) of two DP nodes whose silos differ by one training user."""
    root = tmp_path_factory.mktemp("neighbours")
    silo = sp.neighbour_silo(fed, CLIENT, root / "silos")
    out = []
    for name, silo_dir in (("full", None), ("minus-one", silo)):
        sp.restart_nodes()
        node = sp.make_node(fed, root / name, CLIENT, silo_dir=silo_dir)
        reply = sp.train(fed, node, 1, CLIENT)
        rows = sp.deliver(node, "evaluate", sp.instruction(fed, 1, CLIENT)).rows()
        out.append((reply, rows))
    sp.restart_nodes()
    return out


def test_dp_reply_carries_no_loss_and_no_count(neighbours):
    for reply, rows in neighbours:
        keys = reply.metric_keys()
        assert wire.WEIGHT in keys
        assert keys - {wire.WEIGHT} <= DP_REPLY_METRICS, keys - DP_REPLY_METRICS
        assert not any("loss" in k for k in keys)
        update = reply.update()
        assert update.num_tasks == 1
        assert update.metrics["budget_exhausted"] == 0.0
        assert rows and {r["population"] for r in rows} == {"cold"}
        assert set(reply.message.content.keys()) == {wire.UPDATE, wire.METRICS, wire.META}
        assert dict(reply.message.content[wire.META]) == {"client-id": CLIENT}


def test_neighbours_give_identical_non_noised_fields(fed, neighbours):
    (full, rows_full), (minus, rows_minus) = neighbours
    m_full, m_minus = full.update(), minus.update()
    assert m_full.num_tasks == m_minus.num_tasks
    assert rows_full == rows_minus         # only evaluation-only (cold) users, unchanged
    assert set(m_full.metrics) == set(m_minus.metrics)
    for key in sorted(set(m_full.metrics) - COUNT_DERIVED):
        assert m_full.metrics[key] == m_minus.metrics[key], key
    # the update is the only data-dependent field, and it is noise-sized in both
    for update in (m_full, m_minus):
        assert sp.relative(float(sp.flat(update.delta).std()), fed.noise_std(CLIENT)) < 0.03


def test_neighbours_give_identical_privacy_metrics(neighbours):
    (full, _), (minus, _) = neighbours
    m_full, m_minus = full.update().metrics, minus.update().metrics
    assert set(m_full) == set(m_minus)
    for key in sorted(m_full):
        assert m_full[key] == m_minus[key], (key, m_full[key], m_minus[key])


def test_declared_population_gives_neighbours_identical_replies(fed, tmp_path):
    """A node that declares its population releases nothing that depends on its real size:
    neighbouring silos give the same metrics, to the bit, and noise of the same scale."""
    from dataclasses import fields

    from fedmeta.config import LocalDPConfig

    if "population" not in {f.name for f in fields(LocalDPConfig)}:
        pytest.skip("this code has no privacy.local.population setting")
    declared = sp.dp(population=fed.n_users[CLIENT])
    silo = sp.neighbour_silo(fed, CLIENT, tmp_path / "silos")
    replies = []
    for name, silo_dir in (("full", None), ("minus-one", silo)):
        node = sp.make_node(fed, tmp_path / name, CLIENT, privacy=declared, silo_dir=silo_dir)
        replies.append(sp.train(fed, node, 1, CLIENT).update())
    full, minus = replies
    assert full.num_tasks == minus.num_tasks == 1
    assert full.metrics == minus.metrics
    for update in replies:
        assert sp.relative(float(sp.flat(update.delta).std()), fed.noise_std(CLIENT)) < 0.03


def test_without_dp_the_same_checks_see_the_leak(fed, tmp_path):
    """Contrast: a node whose operator turned DP off. Its reply has the raw training loss,
    the task count (the silo size a neighbour would change by one) as weight, and training
    users' rows -- so each check above can fail."""
    node = sp.make_node(fed, tmp_path / "plain", CLIENT, privacy=sp.dp(enabled=False,
                                                                          noise_multiplier=None))
    reply = sp.train(fed, node, 1, CLIENT)
    keys = reply.metric_keys()
    assert "train_query_loss" in keys and not keys - {wire.WEIGHT} <= DP_REPLY_METRICS
    update = reply.update()
    assert math.isfinite(update.metrics["train_query_loss"])
    assert update.num_tasks == fed.n_users[CLIENT] > 1
    rows = sp.deliver(node, "evaluate", sp.instruction(fed, 1, CLIENT)).rows()
    assert "warm" in {r["population"] for r in rows}


def test_an_undeclared_population_is_refused(fed, tmp_path):
    """The count must be declared: a DP node left to derive it from its data refuses."""
    from fedmeta.privacy.ledger import LedgerError

    with pytest.raises(LedgerError, match="privacy.local.population"):
        sp.make_node(fed, tmp_path / "undeclared", CLIENT, declare=False)
