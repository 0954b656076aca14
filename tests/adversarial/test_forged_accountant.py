"""Attack 3: the server hands the node a forged accountant state.

The attack. In the old protocol a node's DP accountant travelled in every reply
(``meta.state``) and came back in the next message (``fedmeta.state``), so that a node which
lost its ``Context.state`` could carry on; a node without state of its own trusted the
server's copy. A server could therefore reset the spent budget, or replace the noise
multiplier and target it was solved for.

Observed on the old code (bc7380d, ecommerce-0, sigma = 1, restarted node i.e. empty
Context.state):
an honest round 1 released noise of per-coordinate std 0.2499 (sigma C / B = 0.25) and
reported epsilon 0.440; a round 2 carrying ``fedmeta.state`` = {accountant: RDP, delta 0.5,
no target, empty history; noise_multiplier 0.0; the node's own sample rate} was trained
with sigma = 0: std 0.00074, release norm 0.430 (the clipped mean itself), epsilon reported
as inf -- and the next state the server handed back was whatever it liked.

Why it fails now. The accountant is the node's ledger on its own disk, never on the wire:
a ``fedmeta.state`` key or record is refused before anything happens, and the epsilon a
node reports is read from its ledger, which an independent accountant (Google's
dp_accounting) recomputes from the ledger's history. The released update carries noise of
the size the node's own sigma implies; a node whose *operator* sets sigma = 0 shows what a
noiseless release would look like, so the noise check can tell the difference.
"""

from __future__ import annotations

import json
import math

from flwr.app import ConfigRecord, RecordDict

from fedmeta.privacy.accounting import UserLevelAccountant, agrees, independent_epsilon
from fedmeta.privacy.ledger import LEDGER
from wire import WireError
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"


def _forged(fed) -> str:
    q = min(1.0, fed.cfg.algorithm.users_per_step / fed.n_users[CLIENT])
    acc = UserLevelAccountant("rdp", 0.5, None)      # no target, nothing spent
    return json.dumps({"dp": {"accountant": acc.state_dict(), "noise_multiplier": 0.0,
                              "sample_rate": q}, "epsilon": 0.0})


def _ledger(node) -> dict:
    return json.loads((sp.state_dir(node) / LEDGER).read_text())


def _noise_std(delta) -> float:
    return float(sp.flat(delta).std())


def test_forged_state_is_refused_and_epsilon_is_the_ledgers(fed, tmp_path):
    node = sp.make_node(fed, tmp_path / "node", CLIENT)
    forged = _forged(fed)
    q, sigma = fed.cfg.algorithm.users_per_step / fed.n_users[CLIENT], sp.SIGMA

    epsilons = []
    for server_round in (1, 2):
        before = sp.ledger_bytes(node)
        honest = sp.instruction(fed, server_round, CLIENT)
        as_key = sp.with_config(honest, **{"fedmeta.state": forged, "fedmeta.state-round": 0})
        as_record = RecordDict(dict(honest.items()))
        as_record["fedmeta.state"] = ConfigRecord({"state": forged})
        for content in (as_key, as_record):
            reply = sp.deliver(node, "train", content)
            assert reply.refused and isinstance(reply.error, WireError), reply.error
            assert sp.ledger_bytes(node) == before

        reply = sp.train(fed, node, server_round, CLIENT)
        update = reply.update()
        raw = _ledger(node)
        history = raw["accountant"]["history"]
        # the node charged its own sigma and q, once per round, whatever the server sent
        assert history == [[sigma, q, server_round]]
        own = UserLevelAccountant.from_state_dict(raw["accountant"]).epsilon()
        assert update.metrics["epsilon"] == own
        assert raw["plan"]["noise_multiplier"] == sigma
        independent = independent_epsilon(history, raw["plan"]["delta"], "rdp")
        assert agrees(own, independent, "rdp"), (own, independent)
        # the release is noised at the node's own sigma: per-coordinate std sigma C / B
        assert sp.relative(_noise_std(update.delta), fed.noise_std(CLIENT)) < 0.02
        epsilons.append(own)
    assert 0 < epsilons[0] < epsilons[1] < math.inf     # spent budget only grows


def test_noise_check_has_power(fed, tmp_path):
    """A node whose own operator turned the noise off (sigma = 0) releases the clipped mean:
    its std is orders of magnitude below sigma C / B, so the check above would catch a
    message that managed to switch the noise off."""
    node = sp.make_node(fed, tmp_path / "weak", CLIENT, privacy=sp.dp(noise_multiplier=0.0))
    update = sp.train(fed, node, 1, CLIENT).update()
    assert _ledger(node)["plan"]["noise_multiplier"] == 0.0
    assert _noise_std(update.delta) < 0.05 * fed.noise_std(CLIENT)
