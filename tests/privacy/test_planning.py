"""Planning: solving noise for a budget on the larger of two accountants, the inverse, the
like-with-like cross-check, central DP, the delta policy and the plan report."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedmeta.privacy import planning
from fedmeta.privacy.accounting import (UserLevelAccountant, history_epsilon,
                                        independent_epsilon)
from fedmeta.privacy.planning import (EPSILON_TOLERANCE, PlanQuery, central_epsilon,
                                      check_delta_policy, cross_check, curves_agree,
                                      default_delta, epsilon_for_noise, epsilons_for_noise,
                                      noise_for_budget, plan)


@pytest.mark.parametrize("target,delta,q,steps,mechanism", [
    (1.0, 1e-5, 0.01, 1000, "rdp"),
    (3.0, 1e-5, 0.05, 200, "rdp"),
    (8.0, 1e-3, 1.0, 20, "rdp"),       # no subsampling
    (8.0, 1e-3, 0.25, 100, "rdp"),     # the README's plan: a fractional order is optimal
    pytest.param(2.0, 1e-5, 0.02, 300, "prv", marks=pytest.mark.slow),   # PRV: ~4x the time
])
def test_noise_for_budget_fits_both_accountants_just_under_the_target(target, delta, q, steps,
                                                                      mechanism):
    sigma = noise_for_budget(target, delta, q, steps, mechanism)
    eps = epsilon_for_noise(sigma, delta, q, steps, mechanism)
    assert target - EPSILON_TOLERANCE <= eps <= target
    # no accountant finds the plan overspent, asked directly (no tolerance)
    assert history_epsilon([(sigma, q, steps)], delta, mechanism) <= target
    assert independent_epsilon([(sigma, q, steps)], delta, mechanism) <= target
    # sigma is close to the smallest that fits: 2% less noise overspends
    assert epsilon_for_noise(0.98 * sigma, delta, q, steps, mechanism) > target


def test_the_plan_states_the_larger_epsilon():
    # sigma Opacus alone would accept for 8 (7.9994), which dp_accounting puts at 8.15
    sigma, delta, q, steps = 1.5009, 1e-3, 0.25, 100
    ours = history_epsilon([(sigma, q, steps)], delta)
    theirs = independent_epsilon([(sigma, q, steps)], delta)
    assert ours <= 8.0 < theirs
    both = epsilons_for_noise(sigma, delta, q, steps)
    assert (both.opacus, both.dp_accounting) == (ours, theirs)
    assert epsilon_for_noise(sigma, delta, q, steps) == theirs
    assert noise_for_budget(8.0, delta, q, steps) > sigma


def test_opacus_fractional_orders_are_the_divergence_and_dp_accounting_bounds_it():
    """Why the two differ: at a fractional order Opacus matches numerical integration of
    A_alpha, dp_accounting is an upper bound of it; at an integer order they are equal."""
    sigma, q = 1.5, 0.25
    orders, ours, theirs = planning.rdp_curves([(sigma, q, 1)])
    for alpha in (2.6, 3.5, 3.0):
        i = int(np.flatnonzero(np.isclose(orders, alpha))[0])

        def integrand(z):
            return stats.norm.pdf(z, 0, sigma) * ((1 - q) + q * math.exp((2 * z - 1) /
                                                                      (2 * sigma ** 2))) ** alpha

        a, _ = integrate.quad(integrand, -40, 40, epsabs=0, epsrel=1e-12, limit=400)
        exact = math.log(a) / (alpha - 1)
        assert ours[i] == pytest.approx(exact, rel=1e-9)
        if alpha.is_integer():
            assert theirs[i] == pytest.approx(exact, rel=1e-9)
        else:
            assert theirs[i] > exact * (1 + 1e-3)


def test_like_with_like_check_agrees_and_catches_a_wrong_curve(monkeypatch):
    history = [(1.5, 0.25, 100)]
    ok, note = curves_agree(history)
    assert ok and "integer orders" in note
    orders, ours, theirs = planning.rdp_curves(history)
    integer = np.flatnonzero([float(a).is_integer() for a in orders])[0]
    fractional = np.flatnonzero([not float(a).is_integer() and math.isfinite(t)
                                 for a, t in zip(orders, theirs)])[0]

    def dp_accounting_says(index, value):
        changed = theirs.copy()
        changed[index] = value
        return lambda h: (orders, ours, changed)

    monkeypatch.setattr(planning, "rdp_curves",
                        dp_accounting_says(integer, ours[integer] * 1.00001))
    assert not curves_agree(history)[0]
    monkeypatch.setattr(planning, "rdp_curves",
                        dp_accounting_says(fractional, ours[fractional] * 0.99999))
    ok, note = curves_agree(history)
    assert not ok and "below opacus" in note
    # a looser bound, or an order dropped, at a fractional order is no disagreement
    monkeypatch.setattr(planning, "rdp_curves", dp_accounting_says(fractional, math.inf))
    assert curves_agree(history)[0]


def test_cross_check_prv_pairs_opacus_prv_with_dp_accounting_pld():
    res = cross_check([(1.2, 0.05, 200)], 1e-5, "prv")
    assert res.agrees and "PLD" in res.note
    assert res.epsilons.epsilon == max(res.epsilons.opacus, res.epsilons.dp_accounting)
    assert res.epsilons.dp_accounting == independent_epsilon([(1.2, 0.05, 200)], 1e-5, "prv")


def test_epsilon_for_noise_and_noise_for_budget_are_inverse():
    eps = epsilon_for_noise(1.3, 1e-5, 0.03, 400)
    sigma = noise_for_budget(eps, 1e-5, 0.03, 400)
    assert sigma >= 1.3                         # never less noise than needed for that epsilon
    assert sigma == pytest.approx(1.3, rel=0.01)


def test_planned_run_is_affordable_by_the_accountant_and_no_more():
    rounds, local_steps, q, delta, target = 5, 8, 0.1, 1e-4, 2.5
    sigma = noise_for_budget(target, delta, q, rounds * local_steps)
    acc = UserLevelAccountant("rdp", delta, target_epsilon=target)
    for _ in range(rounds):
        assert acc.can_afford(sigma, q, local_steps)
        for _ in range(local_steps):
            acc.step(sigma, q, 1)
    planned = epsilons_for_noise(sigma, delta, q, rounds * local_steps)
    assert planned.opacus <= acc.epsilon() == planned.epsilon <= target
    assert not acc.can_afford(sigma, q, local_steps)


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        noise_for_budget(1e-4, 1e-5, 1.0, 100_000)


def test_a_solver_answer_that_overspends_is_refused(monkeypatch):
    monkeypatch.setattr(planning, "_solve_decreasing", lambda *a: 0.5)
    with pytest.raises(RuntimeError, match="refusing"):
        noise_for_budget(1.0, 1e-5, 0.01, 999)      # steps no other test solves (kept)


@pytest.mark.parametrize("target", [0.3, 3.0, 40.0, 1e4])
def test_solver_lands_in_the_tolerance_band_from_either_side(target):
    calls = []

    def fn(x):                                 # decreasing, like epsilon in sigma
        calls.append(x)
        return 10.0 / x ** 1.3

    x = planning._solve_decreasing(fn, target, 0.005 * target)
    assert target * (1 - 0.005) <= fn(x) <= target
    assert len(calls) < 60


def test_central_epsilon_counts_one_step_per_round():
    eps = central_epsilon(1.0, 0.1, rounds=50, delta=1e-5)
    assert eps == epsilon_for_noise(1.0, 1e-5, 0.1, 50)
    assert eps >= independent_epsilon([(1.0, 0.1, 50)], 1e-5)
    assert eps >= history_epsilon([(1.0, 0.1, 50)], 1e-5)
    assert central_epsilon(1.0, 0.1, rounds=100, delta=1e-5) > eps
    assert central_epsilon(1.0, 1.0, rounds=50, delta=1e-5) > eps   # no amplification


def test_default_delta_policy():
    assert default_delta(1000) == 1e-4
    assert check_delta_policy(1e-5, 1000) == 1e-5
    assert check_delta_policy(1e-4, 1000) == 1e-4
    with pytest.raises(ValueError, match="above 1/"):
        check_delta_policy(2e-4, 1000)
    with pytest.raises(ValueError, match="users"):
        default_delta(0)


def test_plan_reports_both_directions_with_independent_checks():
    query = PlanQuery(target_epsilon=3.0, noise_multiplier=1.0, delta=1e-5, rounds=20,
                      local_steps=10, sample_rate=0.05)
    out = plan(query)
    assert out["total_steps"] == 200
    assert out["noise_for_target"] == noise_for_budget(3.0, 1e-5, 0.05, 200)
    assert 3.0 - EPSILON_TOLERANCE <= out["epsilon_at_noise_for_target"] <= 3.0
    assert out["epsilon_for_noise"] == epsilon_for_noise(1.0, 1e-5, 0.05, 200)
    assert out["epsilon_for_noise"] > 3.0       # sigma=1 is less noise than the target needs
    for key in ("epsilon_at_noise_for_target", "epsilon_for_noise"):
        assert out[key] == max(out["opacus"][key], out["independent"][key])
        assert "integer orders" in out["checks"][key]
    assert out["agrees"] is True


def test_plan_one_direction_only_and_without_verification():
    out = plan(PlanQuery(target_epsilon=None, noise_multiplier=2.0, delta=1e-5, rounds=3,
                         local_steps=5, sample_rate=0.2), verify=False)
    assert out["noise_for_target"] is None and out["epsilon_at_noise_for_target"] is None
    assert out["epsilon_for_noise"] == epsilon_for_noise(2.0, 1e-5, 0.2, 15)
    assert set(out["independent"]) == {"epsilon_for_noise"} and out["checks"] == {}


@pytest.mark.parametrize("change,match", [
    ({"target_epsilon": None, "noise_multiplier": None}, "target_epsilon, noise_multiplier"),
    ({"rounds": 0}, "rounds"), ({"local_steps": 2.5}, "local_steps"),
    ({"sample_rate": 0.0}, "sample_rate"), ({"delta": 1.0}, "delta"),
    ({"mechanism": "gdp"}, "mechanism"), ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"target_epsilon": -2.0}, "target_epsilon"),
])
def test_bad_plan_queries(change, match):
    args = dict(target_epsilon=1.0, noise_multiplier=None, delta=1e-5, rounds=3, local_steps=5,
                sample_rate=0.1)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        PlanQuery(**args)


@pytest.mark.parametrize("call", [
    lambda: noise_for_budget(None, 1e-5, 0.1, 10),
    lambda: noise_for_budget(1.0, 1e-5, 0.1, 0),
    lambda: epsilon_for_noise(1.0, 0.0, 0.1, 10),
    lambda: central_epsilon(1.0, 0.1, rounds=0, delta=1e-5),
])
def test_bad_planning_arguments(call):
    with pytest.raises(ValueError):
        call()
