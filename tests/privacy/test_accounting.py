"""User-level accountant: agreement with dp_accounting, persistence, budget enforcement, checks."""

import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedmeta.privacy import accounting
from fedmeta.privacy.accounting import (RDP_ORDERS, BudgetExceededError, UserLevelAccountant,
                                        agrees, conservative_epsilon, history_epsilon,
                                        independent_epsilon)


def test_rdp_orders_are_dp_accountings_defaults_and_extend_opacus():
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    assert list(RDP_ORDERS) == list(DEFAULT_RDP_ORDERS)
    assert set(RDPAccountant.DEFAULT_ALPHAS) < set(RDP_ORDERS)


@pytest.mark.parametrize("sigma,q,steps,delta", [
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.1, 50, 1e-5),        # optimum at a fractional order
    (5.0, 0.01, 100, 1e-5),      # optimum at order 128, beyond Opacus's default alphas
    (0.6, 1.0, 3, 1e-3),         # no subsampling
    (2.0, 0.001, 10, 1e-6),
    (1.1, 0.05, 200, 1e-5),
])
def test_rdp_epsilon_matches_dp_accounting(sigma, q, steps, delta):
    acc = UserLevelAccountant("rdp", delta)
    acc.step(sigma, q, steps)
    ours = acc.epsilon()
    theirs = independent_epsilon(acc.history, delta)
    assert 0 < ours < math.inf
    assert ours == pytest.approx(theirs, rel=0.01)
    assert agrees(ours, theirs, "rdp")


def test_heterogeneous_history_matches_dp_accounting():
    acc = UserLevelAccountant("rdp", 1e-5)
    for sigma, q, n in [(1.2, 0.02, 100), (0.9, 0.05, 40), (2.0, 0.02, 300), (1.2, 0.02, 7)]:
        acc.step(sigma, q, n)
    assert len(acc.history) == 4
    theirs = independent_epsilon(acc.history, 1e-5)
    assert acc.epsilon() == pytest.approx(theirs, rel=0.01)
    # composition really adds up: more than any single segment on its own
    assert acc.epsilon() > max(history_epsilon([h], 1e-5) for h in acc.history)


def test_large_orders_tighten_small_epsilons():
    acc = RDPAccountant()
    acc.history = [(50.0, 0.01, 10)]
    with pytest.warns(UserWarning, match="largest alpha"):
        opacus_default = acc.get_epsilon(1e-5)
    ours = history_epsilon([(50.0, 0.01, 10)], 1e-5)
    assert ours < 0.5 * opacus_default
    assert ours == pytest.approx(independent_epsilon([(50.0, 0.01, 10)], 1e-5), rel=0.01)


def test_prv_matches_pld_and_is_tighter_than_rdp():
    history = [(1.0, 0.05, 60), (1.5, 0.05, 40)]
    prv = UserLevelAccountant("prv", 1e-5)
    for h in history:
        prv.step(*h)
    ours = prv.epsilon()
    theirs = independent_epsilon(prv.history, 1e-5, "prv")
    assert agrees(ours, theirs, "prv")
    assert abs(ours - theirs) < 0.03
    assert ours < history_epsilon(history, 1e-5, "rdp")


def test_consecutive_identical_steps_are_merged_like_opacus():
    ours = UserLevelAccountant("rdp", 1e-5)
    opacus = RDPAccountant()
    for sigma in [1.0, 1.0, 1.0, 2.0, 2.0, 1.0]:
        ours.step(sigma, 0.1)
        opacus.step(noise_multiplier=sigma, sample_rate=0.1)
    assert ours.history == opacus.history == [(1.0, 0.1, 3), (2.0, 0.1, 2), (1.0, 0.1, 1)]
    ours.step(1.0, 0.1, 4)
    assert ours.history[-1] == (1.0, 0.1, 5)
    assert ours.total_steps == 10


def test_no_steps_is_zero_and_a_noiseless_step_is_infinite():
    for mech in ["rdp", "prv"]:
        acc = UserLevelAccountant(mech, 1e-5)
        assert acc.epsilon() == 0.0
        acc.step(1.0, 0.1, 2)
        acc.step(0.0, 0.1, 1)
        assert acc.epsilon() == math.inf
    assert independent_epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf


def test_epsilon_is_monotone_in_steps():
    eps = []
    for steps in [1, 2, 5, 10, 50, 100, 500]:
        acc = UserLevelAccountant("rdp", 1e-5)
        acc.step(1.0, 0.02, steps)
        eps.append(acc.epsilon())
    assert all(a < b for a, b in zip(eps, eps[1:])), eps


def test_epsilon_after_does_not_step():
    acc = UserLevelAccountant("rdp", 1e-5)
    acc.step(1.0, 0.05, 10)
    before = acc.epsilon()
    after = acc.epsilon_after(1.0, 0.05, 10)
    assert after > before
    assert acc.epsilon() == before and acc.total_steps == 10
    acc.step(1.0, 0.05, 10)
    assert acc.epsilon() == after


@pytest.mark.parametrize("mechanism", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_state_survives_json_and_keeps_accumulating(mechanism):
    acc = UserLevelAccountant(mechanism, 1e-5, target_epsilon=50.0)
    acc.step(1.0, 0.05, 3)
    state = json.loads(json.dumps(acc.state_dict()))
    assert state == acc.state_dict()
    restored = UserLevelAccountant.from_state_dict(state)
    assert restored.epsilon() == acc.epsilon()
    assert (restored.mechanism, restored.delta, restored.target_epsilon) == (mechanism, 1e-5, 50.0)
    restored.step(1.0, 0.05, 2)                  # next round, after a restart
    straight = UserLevelAccountant(mechanism, 1e-5)
    straight.step(1.0, 0.05, 5)
    assert restored.history == straight.history == [(1.0, 0.05, 5)]
    assert restored.epsilon() == straight.epsilon() > acc.epsilon()


def test_state_accepts_a_numpy_history():
    acc = UserLevelAccountant("rdp", 1e-4)
    acc.step(1.3, 0.02, 40)
    acc.step(0.9, 0.02, 7)
    state = acc.state_dict()
    state["history"] = np.asarray(state["history"], dtype=np.float64)
    restored = UserLevelAccountant.from_state_dict(state)
    assert restored.history == acc.history
    assert isinstance(restored.history[0][2], int)
    assert restored.epsilon() == acc.epsilon()


def test_next_round_is_refused_when_it_would_exceed_target():
    sigma, q, local_steps = 1.0, 0.05, 10
    target = conservative_epsilon([(sigma, q, 3 * local_steps)], 1e-5)   # exactly three rounds
    acc = UserLevelAccountant("rdp", 1e-5, target_epsilon=target)
    for _ in range(3):
        assert acc.can_afford(sigma, q, local_steps)
        for _ in range(local_steps):
            acc.step(sigma, q, 1)
    assert acc.epsilon() == target
    assert not acc.can_afford(sigma, q, local_steps)
    assert not acc.can_afford(sigma, q, 1)
    with pytest.raises(BudgetExceededError, match="target"):
        acc.step(sigma, q, 1)
    assert acc.total_steps == 3 * local_steps and acc.epsilon() == target   # nothing recorded


def test_steps_beyond_an_approved_round_are_still_checked(monkeypatch):
    target = conservative_epsilon([(1.0, 0.05, 10)], 1e-5)
    acc = UserLevelAccountant("rdp", 1e-5, target_epsilon=target)
    assert acc.can_afford(1.0, 0.05, 10)
    calls = []
    real = accounting.history_epsilon
    monkeypatch.setattr(accounting, "history_epsilon", lambda *a: calls.append(a) or real(*a))
    for _ in range(10):
        acc.step(1.0, 0.05)
    assert calls == []                         # inside the approved round: no recomputation
    with pytest.raises(BudgetExceededError):
        acc.step(1.0, 0.05)
    with pytest.raises(BudgetExceededError):   # a different sigma is not covered by approval
        UserLevelAccountant("rdp", 1e-5, target_epsilon=target).step(0.9, 0.05, 10)


def test_no_target_affords_anything():
    acc = UserLevelAccountant("rdp", 1e-5)
    assert acc.can_afford(0.5, 1.0, 10_000)
    acc.step(0.5, 1.0, 100)
    assert acc.epsilon() > 100


@pytest.mark.parametrize("kwargs,match", [
    ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": -1e-5}, "delta"),
    ({"delta": float("nan")}, "delta"), ({"delta": None}, "delta"),
    ({"mechanism": "gdp"}, "rdp, prv"), ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": float("inf")}, "target_epsilon"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = {"mechanism": "rdp", "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        UserLevelAccountant(**args)


@pytest.mark.parametrize("sigma,q,steps,match", [
    (-0.1, 0.1, 1, "noise_multiplier"), (float("inf"), 0.1, 1, "noise_multiplier"),
    (1.0, 0.0, 1, "sample_rate"), (1.0, 1.5, 1, "sample_rate"),
    (1.0, float("nan"), 1, "sample_rate"), (1.0, 0.1, 0, "steps"), (1.0, 0.1, 1.5, "steps"),
    (1.0, 0.1, True, "steps"), ("1.0", 0.1, 1, "noise_multiplier"),
])
def test_bad_step_arguments(sigma, q, steps, match):
    acc = UserLevelAccountant("rdp", 1e-5)
    for call in (acc.step, acc.epsilon_after, acc.can_afford):
        with pytest.raises(ValueError, match=match):
            call(sigma, q, steps)
    assert acc.history == []


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("delta"), "missing keys \\['delta'\\]"),
    (lambda s: s.update(extra=1), "unknown keys \\['extra'\\]"),
    (lambda s: s.update(format=2), "format"),
    (lambda s: s.update(mechanism="gdp"), "mechanism"),
    (lambda s: s.update(history="1,0.1,3"), "history must be a list"),
    (lambda s: s["history"].append([1.0, 0.1]), "history\\[1\\]"),
    (lambda s: s["history"].append([1.0, 0.1, 2.5]), "history\\[1\\].*steps"),
    (lambda s: s["history"].append([-1.0, 0.1, 2]), "history\\[1\\].*noise_multiplier"),
])
def test_bad_state_is_rejected(change, match):
    acc = UserLevelAccountant("rdp", 1e-5)
    acc.step(1.0, 0.1, 3)
    state = acc.state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        UserLevelAccountant.from_state_dict(state)


def test_agreement_tolerances():
    assert agrees(2.0, 2.019) and not agrees(2.0, 2.03)
    assert agrees(0.5, 0.51, "prv") and not agrees(0.5, 0.54, "prv")
    assert agrees(math.inf, math.inf) and not agrees(3.0, math.inf)
