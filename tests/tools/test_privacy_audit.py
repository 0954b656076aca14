"""The one-run privacy audit: the bound itself, the audited mechanism, and the audit's verdicts
on a correct, a noiseless and an under-noised privatiser."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from fedmeta.tools import privacy_audit as audit_mod
from fedmeta.privacy.accounting import history_epsilon
from fedmeta.tools.privacy_audit import (AuditSetup, audit, build_private_step, count_correct,
                                   epsilon_lower_bound, one_run_bound, release)
from fedmeta.privacy.local import PrivateStep
from fedmeta.privacy.planning import noise_for_budget

# small directions and few fillers: the mechanism is dimension-agnostic, the bound is not
# (it needs m = 1000 canaries to certify much), so m stays at the paper's size
FAST = AuditSetup(canaries=1000, fillers=200, dim=1000)


# ---- the bound --------------------------------------------------------------------------
def test_without_delta_the_bound_is_the_binomial_tail_in_closed_form():
    # all r guesses correct: eps is ruled out iff p^r <= beta, p = e^eps / (1 + e^eps)
    for r, beta in [(100, 0.05), (400, 0.01), (20, 0.2)]:
        closed = special.logit(beta ** (1 / r))
        assert epsilon_lower_bound(r, r, 1000, 0.0, beta) == math.floor(closed * 100) / 100
        tail = stats.binom.sf(r - 1, r, special.expit(1.234))
        assert one_run_bound(r, r, 1000, 0.0, 1.234)[0, 0] == pytest.approx(tail, rel=1e-12)


def test_the_delta_term_is_kept_and_only_weakens_the_bound():
    v, r, m, eps = 90, 100, 1000, 1.5
    free = one_run_bound(v, r, m, 0.0, eps)[0, 0]
    with_delta = one_run_bound(v, r, m, 1e-5, eps)[0, 0]
    f = stats.binom.sf(np.arange(v - m, v) - 1, r, special.expit(eps))   # f(v - i), i = m..1
    expected = free + 2 * m * 1e-5 * max((f[::-1] - free) / np.arange(1, m + 1))
    assert with_delta == pytest.approx(expected, rel=1e-10)
    assert free < with_delta <= free + 2 * m * 1e-5
    assert (epsilon_lower_bound(v, r, m, 1e-5, 0.05) <= epsilon_lower_bound(v, r, m, 0.0, 0.05))
    assert epsilon_lower_bound(v, r, m, 1e-3, 0.05) < epsilon_lower_bound(v, r, m, 1e-5, 0.05)


@pytest.mark.parametrize("eps,delta,r,m", [(1.0, 0.0, 200, 200), (2.0, 0.0, 100, 400),
                                           (1.0, 1e-4, 200, 400), (0.5, 1e-3, 60, 100)])
def test_the_bound_is_valid_and_tight_for_randomised_response(eps, delta, r, m):
    """Exact, not sampled: each guess of (eps, delta) randomised response is right with
    probability delta + (1 - delta) e^eps / (1 + e^eps), independently; the chance that the
    reported bound exceeds eps must be at most beta, and not far below it (power)."""
    beta = 0.05
    p = delta + (1 - delta) * special.expit(eps)
    over = sum(stats.binom.pmf(w, r, p) for w in range(r + 1)
               if epsilon_lower_bound(w, r, m, delta, beta) > eps)
    assert over <= beta
    if delta == 0.0:
        assert over > beta / 4


def test_bound_edges_and_bad_input():
    assert epsilon_lower_bound(0, 10, 100, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(55, 100, 1000, 1e-5, 0.05) == 0.0          # coin flips
    assert epsilon_lower_bound(80, 100, 1000, 1e-5, 0.05) < epsilon_lower_bound(
        95, 100, 1000, 1e-5, 0.05)
    for bad in [(11, 10, 100, 1e-5, 0.05), (5, 10, 8, 1e-5, 0.05), (5, 10, 100, 1e-5, 1.0)]:
        with pytest.raises(ValueError):
            epsilon_lower_bound(*bad)


# ---- the one-shot estimate --------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_gaussian_epsilon_matches_dp_accounting_for_the_gaussian_mechanism(sigma):
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma))
    assert audit_mod.gaussian_epsilon(1.0, sigma, 0.0, sigma, 1e-5) == pytest.approx(
        acc.get_epsilon(1e-5), rel=1e-4)


@pytest.mark.parametrize("m1,s1,m0,s0,eps", [(1, 2, 0, 1, 0.5), (2, 0.5, 0, 1, 1.0),
                                             (0, 3, 0, 1, 0.2), (1, 1, 0, 1, 0.7)])
def test_hockey_stick_of_two_gaussians_matches_integration(m1, s1, m0, s0, eps):
    from scipy import integrate

    def gap(x):
        return max(0.0, stats.norm.pdf(x, m1, s1) - math.exp(eps) * stats.norm.pdf(x, m0, s0))

    expected, _ = integrate.quad(gap, -60, 60, limit=500, points=[m0, m1])
    assert audit_mod._hockey_stick(eps, m1, s1, m0, s0) == pytest.approx(expected, rel=1e-6)


def test_one_shot_estimate_recovers_a_gaussian_mechanism():
    """Scores from a Gaussian mechanism with shift 1: the estimate is close to its epsilon
    and the interval covers it (10k canaries: the shift is known to +-0.03)."""
    gen = torch.Generator().manual_seed(3)
    included = torch.rand(10_000, generator=gen) < 0.5
    scores = torch.randn(10_000, generator=gen, dtype=torch.float64) * 2.0 + 2.0 * included
    truth = audit_mod.gaussian_epsilon(1.0, 1.0, 0.0, 1.0, 1e-5)
    est, low, high = audit_mod.one_shot_estimate(scores, included, 1e-5)
    assert low < truth < high and est == pytest.approx(truth, rel=0.1)
    assert high - low < 0.2 * truth


# ---- the mechanism ----------------------------------------------------------------------
def test_the_release_is_the_sum_of_clipped_steps_divided_by_the_expected_batch():
    """Without noise, with every user sampled and no fillers: each included canary adds its
    direction clipped to C at every step, and the sum is scaled by a constant."""
    setup = AuditSetup(canaries=6, fillers=0, dim=6, rounds=2, local_steps=3, sample_rate=1.0,
                       filler="none", clip=0.5, canary_norm=3.0)
    gen = torch.Generator().manual_seed(1)
    for kind in ("dirac", "random"):
        canaries = audit_mod.Canaries.draw(kind, 6, 6, 1.5, gen)
        rows = canaries.rows(torch.arange(6))
        assert torch.allclose(rows.norm(dim=1), torch.full((6,), 1.5))
        included = torch.tensor([True, False, True, True, False, False])
        out = release(setup, 0.0, canaries, included, gen)
        expected = 6 * 0.5 * (rows[included].double() / 1.5).sum(0) / 6   # batch: 1.0 x 6
        assert torch.allclose(out, expected, atol=1e-6)
        assert torch.allclose(canaries.scores(expected), (rows.double() / 1.5) @ expected)


def test_model_fillers_send_real_gradients_and_the_audit_runs_on_them():
    # every user in every step (q = 1): with q < 1 some included canaries are never sampled
    setup = AuditSetup(canaries=50, filler="model", rounds=1, local_steps=2, sample_rate=1.0)
    r = audit(setup, math.inf)
    fillers = audit_mod.ModelFillers(setup)
    assert r.fillers == fillers.n > 0
    assert r.dim == sum(v.numel() for v in fillers.like.values())
    grads = fillers.directions(torch.arange(3), torch.Generator().manual_seed(0))
    assert set(grads) == set(fillers.like)
    assert all(g.shape == (3, *fillers.like[k].shape) for k, g in grads.items())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    # no noise, but real gradients land on some canaries' coordinates too
    assert r.lower_bound > 0.5 and r.correct >= 0.8 * r.guesses


def test_noise_of_the_built_step_is_sigma_c_over_the_expected_batch():
    step = build_private_step(0.5, 40, 0.25, 2.0, torch.Generator().manual_seed(0))
    assert isinstance(step, PrivateStep) and step.expected_batch == 10
    out = step.privatize({"w": torch.zeros(3, 100_000)}, {"w": torch.zeros(100_000)})
    assert out["w"].std().item() == pytest.approx(2.0 * 0.5 / 10, rel=0.02)


def test_count_correct():
    scores = torch.tensor([5.0, -1.0, 3.0, 0.0, 9.0, -7.0])
    included = torch.tensor([True, False, False, True, True, True])
    # top 2: items 4 (in), 0 (in) -> 2 right; bottom 2: items 5 (in), 1 (out) -> 1 right
    assert count_correct(scores, included, 2) == 3


# ---- the audit's verdicts ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sigmas():
    return {eps: noise_for_budget(eps, FAST.delta, FAST.sample_rate, FAST.total_steps)
            for eps in (1.0, 4.0, 8.0)}


def test_without_noise_the_audit_has_power():
    r = audit(FAST, math.inf)
    assert r.noise_multiplier == 0.0 and math.isinf(r.epsilon)
    assert r.lower_bound > 3.0
    assert 400 <= r.included <= 600


@pytest.mark.parametrize("eps", [1.0, 4.0, 8.0])
def test_with_noise_the_bound_stays_below_the_accountant(eps, sigmas):
    r = audit(FAST, eps, noise_multiplier=sigmas[eps])
    assert r.epsilon == history_epsilon([(sigmas[eps], FAST.sample_rate, FAST.total_steps)],
                                        FAST.delta) <= eps
    assert r.epsilon_dp_accounting <= eps
    assert 0.0 <= r.lower_bound <= r.epsilon
    assert r.delta == FAST.delta and r.confidence == 0.95 and r.canaries == 1000
    assert 0.0 <= r.one_shot_low <= r.one_shot <= r.one_shot_high


def test_an_under_noised_privatiser_is_caught(sigmas, monkeypatch):
    real = build_private_step
    monkeypatch.setattr(audit_mod, "build_private_step",      # a tenth of the noise it claims
                        lambda clip, n, q, sigma, gen: real(clip, n, q, sigma / 10, gen))
    r = audit(FAST, 1.0, noise_multiplier=sigmas[1.0])
    assert r.epsilon <= 1.0 < r.lower_bound
    assert audit_mod.violations([r]) == [r]


def test_random_canaries_and_no_fillers_also_audit():
    setup = AuditSetup(canaries=300, fillers=0, dim=2000, canary="random", filler="none",
                       rounds=4, local_steps=5)
    r = audit(setup, math.inf)
    # canaries in general position interfere a little (no coordinate of their own)
    assert r.lower_bound > 1.5 and r.correct >= 0.9 * r.guesses


@pytest.mark.parametrize("change,match", [
    ({"canaries": 1}, "canaries"), ({"fillers": -1}, "fillers"), ({"dim": 10}, "dim"),
    ({"canary_norm": 0.5}, "canary_norm"), ({"confidence": 1.0}, "confidence"),
    ({"canary": "x"}, "canary"), ({"filler": "x"}, "filler"), ({"delta": 0.0}, "delta"),
    ({"guess_fractions": (0.7,)}, "guess_fractions"), ({"sample_rate": 0.0}, "sample_rate"),
    ({"filler": "model", "canary": "random"}, "dirac"),
])
def test_bad_setups(change, match):
    with pytest.raises(ValueError, match=match):
        AuditSetup(**change)
