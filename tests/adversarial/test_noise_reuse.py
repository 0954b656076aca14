"""Attack 5: the server makes a node reuse its noise, then differences the releases.

The attack. If two releases carry the same noise, their difference is noiseless: a server
that replays a round (with other global arrays) learns the difference of two clipped sums
exactly, and two nodes drawing the same noise give away the difference of their users'
directions. The old code keyed the noise on (run seed, user count, steps taken): the same
for every replay to a restarted node (the server handed back the old step count in its
``fedmeta.state``) and for any two silos of equal size.

Observed on the old code (bc7380d, tiny config at sigma = 1, SGD at rate 1, B = 4):

* replaying round 1 to restarted ecommerce-0 with the global arrays P and then 0.9 P: the
  releases differed by norm 0.0377 (a noiseless difference of clipped sums; fresh noise
  would give ~204.8), and an identical replay gave a difference of exactly 0;
* ecommerce-1 and social-1 (41 training users each), same round: the plain difference had
  the full noise size (the token-table cut has a data-dependent length, which shifts the
  shared stream), but shifting one release by 109 token rows (64 * 109 coordinates) lined
  the streams up: rms of the aligned difference 0.089 against 0.355 unaligned, and 87.7% of
  the 66,497 overlapping coordinates agreed to 1e-3 (chance: 0.2%).

Why it fails now. Every round's generator is freshly seeded from ``os.urandom``; with a
reproducibility secret the seed is HMAC(secret, client id / train / ledger step count),
and the ledger's step count only grows with every charged round. So a replay, or a second
node, draws fresh noise: every difference keeps the variance of two independent noise
draws, per-coordinate std sqrt(2) sigma C / B, at no alignment. The check has power: two
nodes of the *same* client with the same secret at the same step count do release
identical updates (difference exactly 0) -- what a nonce that did not advance would give.
"""

from __future__ import annotations

import json
import math

import torch

from fedmeta.privacy.ledger import LEDGER
from tests.adversarial import server_play as sp

A, B = "ecommerce-1", "social-1"      # same number of training users
SECRET = "a-simulation-secret-0123456789"


def _fresh_difference(fed, x: torch.Tensor, y: torch.Tensor, client: str, what: str) -> None:
    diff = x - y
    expected = math.sqrt(2) * fed.noise_std(client)
    assert sp.relative(float(diff.std()), expected) < 0.03, (what, float(diff.std()), expected)
    assert float((diff.abs() < 1e-3).double().mean()) < 0.01, what     # chance: ~0.2%


def _aligned(x: torch.Tensor, y: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlap of x[j] and y[j + shift] (how a shifted shared stream would line up)."""
    n = x.numel() - abs(shift)
    return (x[:n], y[shift:shift + n]) if shift >= 0 else (x[-shift:-shift + n], y[:n])


def _steps(node) -> int:
    return json.loads((sp.state_dir(node) / LEDGER).read_text())["accountant"]["history"][0][2]


def test_replays_and_equal_sized_nodes_draw_fresh_noise(fed, tmp_path, monkeypatch):
    assert fed.n_users[A] == fed.n_users[B]
    steps = sp.spy_private_steps(monkeypatch)
    node_a = sp.make_node(fed, tmp_path / "a", A)
    node_b = sp.make_node(fed, tmp_path / "b", B)
    shrunk = {k: 0.9 * v for k, v in fed.params.items()}
    first_delta = sp.train(fed, node_a, 1, A).update().delta
    replay = sp.flat(sp.train(fed, node_a, 1, A, params=shrunk).update().delta)
    other_delta = sp.train(fed, node_b, 1, B).update().delta
    first, other = sp.flat(first_delta), sp.flat(other_delta)
    assert _steps(node_a) == 2              # the replay was charged as a release of its own

    _fresh_difference(fed, first, replay, A, "replayed round")
    _fresh_difference(fed, first, other, A, "two nodes, same user count")
    # the alignment that lined up the old code's shared stream lines up nothing now
    keys = sp.non_token_keys(fed.params)
    rows_a, rows_b = steps[0].token_rows, steps[2].token_rows
    xa, xb = sp.flat(first_delta, keys), sp.flat(other_delta, keys)
    # a step whose Poisson sample (os.urandom) was empty privatizes no cut of the table: no row
    # count (None): there is no cut length to line the streams up by, only the plain overlap
    shifts = {0}
    if rows_a is not None and rows_b is not None:
        shift = fed.params[sp.TOKEN_TABLE].shape[1] * (rows_a - rows_b)
        shifts |= {shift, -shift}
    for s in shifts:
        x, y = _aligned(xa, xb, s)
        _fresh_difference(fed, x, y, A, f"aligned by {s}")


def test_reproducible_secret_nonce_advances(fed, tmp_path):
    """With a secret (reproducible simulations), noise is a function of (secret, client,
    ledger steps): identical for the same client at the same step count (power), fresh for
    a replay (the step count moved) and for another client of the same size."""
    secret = sp.dp(reproducible_secret=SECRET)
    node_a = sp.make_node(fed, tmp_path / "a", A, privacy=secret)
    twin = sp.make_node(fed, tmp_path / "twin", A, privacy=secret)
    node_b = sp.make_node(fed, tmp_path / "b", B, privacy=secret)
    first = sp.train(fed, node_a, 1, A)
    assert first.update().metrics["private_against_server"] == 0.0   # and it says so
    first = sp.flat(first.update().delta)
    same = sp.flat(sp.train(fed, twin, 1, A).update().delta)
    assert torch.equal(first, same)          # the statistic would see reused noise: 0 exactly

    replay = sp.flat(sp.train(fed, node_a, 1, A).update().delta)
    other = sp.flat(sp.train(fed, node_b, 1, B).update().delta)
    _fresh_difference(fed, first, replay, A, "replay with a secret")
    _fresh_difference(fed, first, other, A, "other client with a secret")
