"""Attack 8: the server asks for more than the node's privacy budget allows.

The attack. A node with a target epsilon solves its noise for the planned run (rounds x
local steps). A server that simply keeps sending rounds past the plan, or that changes the
run config so each round takes more steps (``algorithm.local_steps``), a larger sample
(``algorithm.users_per_step``: a larger q costs more per step) or a longer plan
(``runtime.rounds``: the node would solve a smaller sigma), would spend more than the node's
target if the node went along.

Old code (bc7380d): the run config came with the message (Hydra overrides), so a server
could set ``algorithm.local_steps`` or ``users_per_step`` per message; the accountant
refused steps past its target, but a node that lost its state took the server's copy
(``test_forged_accountant``), whose target the server chose.

Now: the node charges each round to its own ledger *before* training it, and a charge that
would take epsilon past the target is refused, with no tolerance: the reply says
``budget_exhausted``, carries a zero update and weight 0, the ledger is untouched and no
step is taken (no sample drawn, no noise generated). Epsilon never exceeds the target, as
the ledger computes it and as Google's dp_accounting recomputes it from the ledger's
history. A run config that differs from the node's own in any key is refused before
anything is charged, so the number and size of the steps are the node's.
"""

from __future__ import annotations

import copy
import json

import torch

from fedmeta.privacy.accounting import UserLevelAccountant, independent_epsilon
from fedmeta.privacy.ledger import LEDGER
from fedmeta.runtime.node import RunMismatch
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"
TARGET = 0.2     # solves to sigma ~ 2.3 for the 2 planned steps (a quick solve)


def _ledger(node) -> dict:
    return json.loads((sp.state_dir(node) / LEDGER).read_text())


def _greedy_runs(fed):
    out = {}
    for name, path, value in (("more local steps", ("algorithm", "local_steps"), 10),
                              ("larger sample", ("algorithm", "users_per_step"), 36),
                              ("longer plan", ("rounds",), 100),
                              ("shorter plan", ("rounds",), 1)):
        run = copy.deepcopy(fed.run)
        where = run
        for key in path[:-1]:
            where = where[key]
        assert path[-1] in where
        where[path[-1]] = value
        out[name] = run
    return out


def test_rounds_past_the_target_are_refused(fed, tmp_path, monkeypatch):
    node = sp.make_node(fed, tmp_path / "node", CLIENT,
                        privacy=sp.dp(noise_multiplier=None, target_epsilon=TARGET))
    steps = sp.spy_private_steps(monkeypatch)
    planned = fed.run["rounds"] * fed.run["algorithm"]["local_steps"]

    trained = []
    first = sp.train(fed, node, 1, CLIENT).update()
    trained.append(first)
    # a greedy run config, while budget is left: refused before anything is charged
    for name, run in _greedy_runs(fed).items():
        before, taken = sp.ledger_bytes(node), len(steps)
        reply = sp.train(fed, node, 2, CLIENT, run=run)
        assert reply.refused and isinstance(reply.error, RunMismatch), (name, reply.error)
        assert sp.ledger_bytes(node) == before and len(steps) == taken, name
    trained.append(sp.train(fed, node, 2, CLIENT).update())
    assert len(steps) == planned

    for server_round in (3, 4, 50):          # the server keeps going
        before = sp.ledger_bytes(node)
        reply = sp.train(fed, node, server_round, CLIENT)
        update = reply.update()
        assert update.metrics["budget_exhausted"] == 1.0
        assert update.num_tasks == 0
        assert set(update.delta) == set(fed.params)
        assert all(torch.count_nonzero(v) == 0 for v in update.delta.values())
        assert sp.ledger_bytes(node) == before     # nothing charged ...
        assert len(steps) == planned               # ... and nothing trained
        assert update.metrics["epsilon"] <= TARGET

    for update in trained:
        assert update.metrics["budget_exhausted"] == 0.0
        assert 0 < update.metrics["epsilon"] <= TARGET
        assert torch.count_nonzero(sp.flat(update.delta)) > 0
    assert trained[0].metrics["epsilon"] < trained[1].metrics["epsilon"]

    raw = _ledger(node)
    history = raw["accountant"]["history"]
    assert sum(n for _, _, n in history) == planned
    sigma = raw["plan"]["noise_multiplier"]
    assert history == [[sigma, fed.cfg.algorithm.users_per_step / fed.n_users[CLIENT], planned]]
    own = UserLevelAccountant.from_state_dict(raw["accountant"]).epsilon()
    assert own <= TARGET and own == trained[1].metrics["epsilon"]
    assert independent_epsilon(history, raw["plan"]["delta"], raw["plan"]["mechanism"]) <= TARGET
    # power: one more round at the node's own sigma and q would have gone past the target
    acc = UserLevelAccountant.from_state_dict(raw["accountant"])
    assert acc.epsilon_after(sigma, history[0][1], 1) > TARGET
