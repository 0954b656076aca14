"""Planning: solving noise for a budget, the inverse, central DP, and the plan report."""

import pytest

from fedmeta.privacy import planning
from fedmeta.privacy.accounting import UserLevelAccountant, agrees, independent_epsilon
from fedmeta.privacy.planning import (EPSILON_TOLERANCE, PlanQuery, central_epsilon,
                                      epsilon_for_noise, noise_for_budget, plan)


@pytest.mark.parametrize("target,delta,q,steps,mechanism", [
    (1.0, 1e-5, 0.01, 1000, "rdp"),
    (3.0, 1e-5, 0.05, 200, "rdp"),
    (8.0, 1e-3, 1.0, 20, "rdp"),       # no subsampling
    (2.0, 1e-5, 0.02, 300, "prv"),
])
def test_noise_for_budget_spends_just_under_the_target(target, delta, q, steps, mechanism):
    sigma = noise_for_budget(target, delta, q, steps, mechanism)
    eps = epsilon_for_noise(sigma, delta, q, steps, mechanism)
    assert target - EPSILON_TOLERANCE <= eps <= target
    # sigma is close to the smallest that fits: 2% less noise overspends
    assert epsilon_for_noise(0.98 * sigma, delta, q, steps, mechanism) > target
    assert agrees(eps, independent_epsilon([(sigma, q, steps)], delta, mechanism), mechanism)


def test_epsilon_for_noise_and_noise_for_budget_are_inverse():
    eps = epsilon_for_noise(1.3, 1e-5, 0.03, 400)
    sigma = noise_for_budget(eps, 1e-5, 0.03, 400)
    assert sigma >= 1.3                         # never less noise than needed for that epsilon
    assert sigma == pytest.approx(1.3, rel=0.01)


def test_planned_run_is_exactly_affordable_by_the_accountant():
    rounds, local_steps, q, delta, target = 5, 8, 0.1, 1e-4, 2.5
    sigma = noise_for_budget(target, delta, q, rounds * local_steps)
    acc = UserLevelAccountant("rdp", delta, target_epsilon=target)
    for _ in range(rounds):
        assert acc.can_afford(sigma, q, local_steps)
        for _ in range(local_steps):
            acc.step(sigma, q, 1)
    assert acc.epsilon() == epsilon_for_noise(sigma, delta, q, rounds * local_steps) <= target
    assert not acc.can_afford(sigma, q, local_steps)


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        noise_for_budget(1e-4, 1e-5, 1.0, 100_000)


def test_a_solver_answer_that_overspends_is_refused(monkeypatch):
    monkeypatch.setattr(planning, "get_noise_multiplier", lambda **kw: 0.5)
    with pytest.raises(RuntimeError, match="refusing"):
        noise_for_budget(1.0, 1e-5, 0.01, 1000)


def test_central_epsilon_counts_one_step_per_round():
    eps = central_epsilon(1.0, 0.1, rounds=50, delta=1e-5)
    assert eps == epsilon_for_noise(1.0, 1e-5, 0.1, 50)
    assert eps == pytest.approx(independent_epsilon([(1.0, 0.1, 50)], 1e-5), rel=0.01)
    assert central_epsilon(1.0, 0.1, rounds=100, delta=1e-5) > eps
    assert central_epsilon(1.0, 1.0, rounds=50, delta=1e-5) > eps   # no amplification


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
        assert out["independent"][key] == pytest.approx(out[key], rel=0.01)
    assert out["agrees"] is True


def test_plan_one_direction_only():
    out = plan(PlanQuery(target_epsilon=None, noise_multiplier=2.0, delta=1e-5, rounds=3,
                         local_steps=5, sample_rate=0.2))
    assert out["noise_for_target"] is None and out["epsilon_at_noise_for_target"] is None
    assert out["epsilon_for_noise"] == epsilon_for_noise(2.0, 1e-5, 0.2, 15)
    assert set(out["independent"]) == {"epsilon_for_noise"}


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
