"""Attack 10: the server sends poisoned global arrays (NaN, inf, unknown or misshapen).

The attack. User-level DP-SGD bounds each user's influence by clipping the user's direction
to norm C before the noise is added. That bound has to hold for *any* global arrays,
because the server picks them. Clipping multiplies a direction by ``min(1, C / norm)``; for
a non-finite direction the norm is NaN or inf and the factor NaN or 0, and 0 * inf is NaN:
one user whose direction is non-finite turns the whole noised sum into NaN (or a NaN at the
coordinates where it is infinite). NaN + noise is NaN, so whether a release is NaN is an
un-noised bit about the sampled users. A server can make a direction non-finite for the
users who touch chosen parameters -- e.g. the token rows of one item, under a sampled
softmax (catalogues larger than the full-softmax limit), where only users with that item in
their history, targets or negatives read them.

What the tests found (both fixed since):

* ``PrivateStep.privatize`` does not bound a non-finite user: two neighbouring batches
  (four users, and the same four plus one whose direction holds a NaN) give a finite
  release and an all-NaN one, with the same generator state -- where any finite direction,
  however large (1e30, 3e38), moves the release by at most C / B (checked, passing).
* The node accepts NaN arrays (and an unknown extra array, which comes back as pure noise
  under its own name), charges the round, and releases a NaN update; misshapen arrays or the
  private table's name fail only after the round was charged. On the tiny config the whole
  update is NaN (the full softmax reads every item for every user), so no data-dependent
  bit leaks *here*; the mechanism-level test shows why it can elsewhere.

Proposed fix: (1) ``Node.train`` (fedmeta/runtime/node.py), before ``ledger.charge``: refuse
arrays whose names are not exactly the model's meta-parameters, whose shapes or dtypes
differ, or which are not all finite (raise, so the reply is an error and nothing is
charged). (2) ``PrivateStep.privatize`` (fedmeta/privacy/local.py): before handing
``grad_sample`` to Opacus, zero every user whose direction is not finite in every tensor
(``ok = all(torch.isfinite(g).flatten(1).all(1))``; ``g[~ok] = 0``), so each user's
contribution stays within C for any arrays.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedmeta.privacy.local import PrivateStep
from fedmeta.model.recommender import private_parameters
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"


def _release(per_user: dict, like: dict, seed: int = 7) -> dict:
    """One privatised step at sigma 1, C 1, expected batch 4, from a fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    step = PrivateStep(sp.dp(noise_multiplier=1.0), n_users=40, sample_rate=0.1,
                       noise_multiplier=1.0, generator=gen)
    return step.privatize(per_user, like)


def _neighbours(extra: torch.Tensor):
    gen = torch.Generator().manual_seed(0)
    like = {"a": torch.zeros(6), "b": torch.zeros(2, 3)}
    base = {k: torch.randn(4, *v.shape, generator=gen) for k, v in like.items()}
    plus = {k: torch.cat([v, torch.zeros(1, *v.shape[1:])]) for k, v in base.items()}
    plus["a"][-1] = extra
    return like, base, plus


def _distance(x: dict, y: dict) -> float:
    return float(torch.sqrt(sum(((x[k] - y[k]) ** 2).sum() for k in x)))


@pytest.mark.parametrize("scale", [1e3, 1e30, 3e38])
def test_one_more_finite_user_moves_the_release_by_at_most_c_over_b(scale):
    like, base, plus = _neighbours(torch.full((6,), scale))
    a, b = _release(base, like), _release(plus, like)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert _distance(a, b) <= 1.0 / 4 + 1e-5          # C / B: one user's clipped share


def test_poisoned_arrays_are_refused_before_anything_is_charged(fed, tmp_path):
    run = copy.deepcopy(fed.run)
    run["model"]["private_item_embeddings"] = True
    node = sp.make_node(fed, tmp_path / "node", CLIENT, run=run)
    from fedmeta.runtime.node import Node, NodeConfig

    private = private_parameters(Node(NodeConfig.load(node)).model)
    nan = {**fed.params, "items.proj.bias": torch.full_like(fed.params["items.proj.bias"],
                                                            float("nan"))}
    cases = {"NaN": nan,
             "inf": {**fed.params, sp.TOKEN_TABLE: fed.params[sp.TOKEN_TABLE] * float("inf")},
             "unknown array": {**fed.params, "evil": torch.zeros(3)},
             "wrong shape": {**fed.params, "items.proj.bias": torch.zeros(7)},
             "private table's name": {**fed.params, **private}}
    for name, params in cases.items():
        before = sp.ledger_bytes(node)
        reply = sp.train(fed, node, 1, CLIENT, run=run, params=params)
        assert reply.refused, f"{name}: accepted"
        assert sp.ledger_bytes(node) == before, f"{name}: charged"
