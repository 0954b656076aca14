"""Answer privacy questions before training: which noise buys a budget, which budget a noise.

The noise multiplier for a target is solved *once* for the whole planned run (all rounds x
local steps at the client's sample rate), never per round: re-solving each round for the
remaining budget would give a different sigma every time and make the spend order-dependent.

Two accountants, one figure. Every epsilon a plan states is computed by Opacus (what a
client's :class:`~fedmeta.privacy.accounting.UserLevelAccountant` reports) *and* by Google's
dp_accounting, at the same delta on the same RDP orders (:data:`RDP_ORDERS`; PRV is paired
with dp_accounting's PLD), and the plan states the **larger** one. The solved sigma is the
one whose larger epsilon is within the target, so no accountant can find the plan overspent.

Why the two differ at all (RDP). At integer orders both evaluate the same finite binomial sum
and agree to floating-point precision. At fractional orders the subsampled Gaussian's
``A_alpha`` is an infinite series whose binomial coefficients alternate in sign past
``alpha``: Opacus keeps the signs (its values match numerical integration of the Renyi
divergence to ~1e-12), dp_accounting (0.6) adds the absolute values, an upper bound of the
same integral, and drops an order whose series does not converge. When a small fractional
order is optimal -- moderate sigma, q well below 1 -- dp_accounting's epsilon is therefore
larger (8.15 vs 8.00 for the README's example). Comparing the two epsilons against a 1%
tolerance compared a tight value with a looser bound; :func:`cross_check` instead compares
like with like (equal at integer orders, dp_accounting never below Opacus at fractional
ones) and the plan reports the larger epsilon.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedmeta.privacy.accounting import (RDP_ORDERS, agrees, check_delta, check_entry,
                                        check_mechanism, check_steps, check_target,
                                        history_epsilon, independent_epsilon)

log = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.005     # the solved sigma spends within this much below the target
MAX_SIGMA = 1e6               # a target that needs more noise than this is unreachable
# Floating-point agreement of two RDP curves, in RDP units (= epsilon units at that order):
# a consistency check between the libraries, not a budget check (the budget takes the max).
CURVE_TOL = 1e-9
DELTA_PER_USER = 10           # default delta = 1 / (DELTA_PER_USER * users)

Entry = tuple[float, float, int]


# ---- epsilon from both accountants ------------------------------------------------------
@dataclass(frozen=True)
class Epsilon:
    """One release history's epsilon at ``delta`` from both accountants.

    ``epsilon`` is the larger of the two: the figure a plan states and solves against.
    """

    opacus: float
    dp_accounting: float
    delta: float
    mechanism: str

    @property
    def epsilon(self) -> float:
        return max(self.opacus, self.dp_accounting)


def both_epsilons(history: Sequence[Entry], delta: float, mechanism: str = "rdp") -> Epsilon:
    history = [check_entry(*h) for h in history]
    delta, mechanism = check_delta(delta), check_mechanism(mechanism)
    ours = history_epsilon(history, delta, mechanism)
    if math.isinf(ours):
        theirs = math.inf        # a noiseless step: dp_accounting has no finite answer either
    else:
        theirs = max(0.0, independent_epsilon(history, delta, mechanism))
    if math.isnan(theirs):
        raise ArithmeticError(f"dp_accounting returned NaN for history {history}")
    return Epsilon(ours, theirs, delta, mechanism)


def epsilons_for_noise(noise_multiplier: float, delta: float, sample_rate: float,
                       total_steps: int, mechanism: str = "rdp") -> Epsilon:
    entry = check_entry(noise_multiplier, sample_rate, check_steps(total_steps, "total_steps"))
    return both_epsilons([entry], delta, mechanism)


def epsilon_for_noise(noise_multiplier: float, delta: float, sample_rate: float,
                      total_steps: int, mechanism: str = "rdp") -> float:
    """The plan's epsilon for a noise: the larger of Opacus's and dp_accounting's."""
    return epsilons_for_noise(noise_multiplier, delta, sample_rate, total_steps,
                              mechanism).epsilon


# ---- like with like ---------------------------------------------------------------------
def rdp_curves(history: Sequence[Entry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orders, Opacus RDP, dp_accounting RDP) of a composed history on :data:`RDP_ORDERS`."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.asarray(RDP_ORDERS, dtype=float)
    entries = [check_entry(*h) for h in history]
    ours = np.zeros_like(orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sigma, q, n in entries:
            ours = ours + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=n,
                                                 orders=orders), dtype=float)
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    for sigma, q, n in entries:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n))
    return orders, ours, np.asarray(acc.rdp, dtype=float)


def curves_agree(history: Sequence[Entry]) -> tuple[bool, str]:
    """Compare the two RDP curves where they compute the same quantity.

    Integer orders: the same finite sum, so equal to :data:`CURVE_TOL`. Fractional orders:
    dp_accounting's unsigned series bounds the signed one from above, so it may be larger
    (or infinite: an order it dropped) but never smaller beyond :data:`CURVE_TOL`.
    """
    orders, ours, theirs = rdp_curves(history)
    integer = np.array([float(a).is_integer() for a in orders])
    bad: list[str] = []
    for a, o, t, is_int in zip(orders, ours, theirs, integer):
        if math.isinf(o) and math.isinf(t):
            continue
        slack = CURVE_TOL * max(1.0, abs(o), abs(t) if math.isfinite(t) else 0.0)
        if is_int and not (math.isfinite(o) and math.isfinite(t) and abs(o - t) <= slack):
            bad.append(f"order {a:g}: opacus {o:.12g} vs dp_accounting {t:.12g}")
        elif not is_int and not (math.isinf(t) or t >= o - slack):
            bad.append(f"order {a:g}: dp_accounting {t:.12g} below opacus {o:.12g}")
    if bad:
        return False, "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
    n_int = int(integer.sum())
    return True, (f"equal at the {n_int} integer orders, dp_accounting >= opacus at the "
                  f"{len(orders) - n_int} fractional ones")


@dataclass(frozen=True)
class CrossCheck:
    epsilons: Epsilon
    agrees: bool
    note: str


def cross_check(history: Sequence[Entry], delta: float, mechanism: str = "rdp") -> CrossCheck:
    """Both epsilons and whether the two accountants agree, compared like with like.

    RDP: :func:`curves_agree`. PRV: Opacus's PRV against dp_accounting's PLD, both numerical
    privacy-loss-distribution accountants, within :func:`~fedmeta.privacy.accounting.agrees`.
    """
    eps = both_epsilons(history, delta, mechanism)
    if mechanism == "rdp":
        ok, note = curves_agree(history)
    else:
        ok = agrees(eps.opacus, eps.dp_accounting, "prv")
        note = (f"opacus PRV {eps.opacus:.6g} vs dp_accounting PLD {eps.dp_accounting:.6g} "
                f"({'within' if ok else 'beyond'} the documented tolerance)")
    return CrossCheck(eps, ok, note)


# ---- solving ----------------------------------------------------------------------------
def _solve_decreasing(fn: Callable[[float], float], target: float, tol: float) -> float:
    """Smallest-ish x with fn(x) <= target, fn decreasing in x: the returned x always has
    fn(x) <= target, and fn(x) >= target - tol unless fn is flat there.

    Bracket by factors of 2 from x=1, then Illinois false position on log(fn) over log(x)
    (epsilon is close to a power law in sigma, so this converges in a few evaluations),
    with bisection whenever false position stalls.
    """
    cache: dict[float, float] = {}

    def f(x: float) -> float:
        if x not in cache:
            cache[x] = fn(x)
        return cache[x]

    lo, hi = 1.0, 1.0
    if f(1.0) > target:
        while f(hi) > target:
            lo, hi = hi, hi * 2.0
            if hi == 32.0 and f(MAX_SIGMA) > target:     # settle hopeless targets at once
                raise ValueError(f"needs noise_multiplier > {MAX_SIGMA:g}")
    else:
        while f(lo) <= target:
            hi, lo = lo, lo / 2.0
            if lo < 1e-6:
                return hi

    aim = math.log(max(target - tol / 2, target / 2))    # the middle of the band

    def g(x: float) -> float:             # the secant's coordinate; sides are decided on f
        v = f(x)
        return math.inf if math.isinf(v) else math.log(max(v, 1e-300)) - aim

    a, b = math.log(lo), math.log(hi)
    ga, gb, last = g(lo), g(hi), ""
    for _ in range(100):
        if f(hi) >= target - tol or b - a < 1e-12:
            break
        c = b - gb * (b - a) / (gb - ga) if math.isfinite(ga) else 0.5 * (a + b)
        if not a < c < b:
            c = 0.5 * (a + b)
        x = math.exp(c)
        gc = g(x)
        if f(x) > target:                   # overspends (compared exactly, not in logs)
            a, ga, lo = c, gc, x
            if last == "a":                 # Illinois: b kept twice, halve its weight
                gb /= 2.0
            last = "a"
        else:
            b, gb, hi = c, gc, x
            if last == "b" and math.isfinite(ga):
                ga /= 2.0
            last = "b"
    return hi


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float,
                     total_steps: int, mechanism: str = "rdp") -> float:
    """The noise multiplier whose larger epsilon (Opacus, dp_accounting) fits the target.

    It spends within :data:`EPSILON_TOLERANCE` below the target on the larger figure, so a
    client accountant (Opacus) with the same target affords the whole planned run. Answers
    are kept per process (nodes of one simulation plan the same run).
    """
    target = check_target(target_epsilon)
    if target is None:
        raise ValueError("target_epsilon is required to solve for a noise multiplier")
    _, q, steps = check_entry(1.0, sample_rate, check_steps(total_steps, "total_steps"))
    return _noise_for_budget(target, check_delta(delta), q, steps, check_mechanism(mechanism))


@functools.lru_cache(maxsize=64)
def _noise_for_budget(target: float, delta: float, q: float, steps: int,
                      mechanism: str) -> float:
    def larger(sigma: float) -> float:
        return epsilons_for_noise(sigma, delta, q, steps, mechanism).epsilon

    try:
        sigma = _solve_decreasing(larger, target, EPSILON_TOLERANCE)
    except ValueError as e:
        raise ValueError(f"target_epsilon={target} at delta={delta} is unreachable for "
                         f"{steps} steps at sample_rate={q} ({mechanism}): {e}") from None
    eps = epsilons_for_noise(sigma, delta, q, steps, mechanism)
    if not (math.isfinite(sigma) and sigma > 0 and eps.epsilon <= target):
        raise RuntimeError(f"noise solver returned sigma={sigma} spending epsilon="
                           f"{eps.epsilon} > target {target}; refusing to use it")
    log.info("noise_multiplier %.4f spends epsilon %.4f (opacus %.4f, dp_accounting %.4f) of "
             "%.4f at delta=%.2e (q=%.4g, %d steps, %s)", sigma, eps.epsilon, eps.opacus,
             eps.dp_accounting, target, delta, q, steps, mechanism)
    return sigma


def central_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                    mechanism: str = "rdp") -> float:
    """Client-level epsilon of central DP: one Gaussian aggregation per round.

    ``sample_rate`` is the fraction of clients taking part in a round. The bound assumes
    Poisson client sampling; a fixed-size random subset (what Flower does) is the customary
    approximation of it, and with every client in every round (rate 1) it is exact.
    """
    return epsilon_for_noise(noise_multiplier, delta, sample_rate,
                             check_steps(rounds, "rounds"), mechanism)


# ---- delta policy -----------------------------------------------------------------------
def default_delta(n_users: int) -> float:
    """delta = 1 / (10 n): a total failure of the guarantee must be far less likely than
    picking any one of the n users the guarantee protects."""
    n = check_steps(n_users, "users")
    return 1.0 / (DELTA_PER_USER * n)


def check_delta_policy(delta: float, n_users: int) -> float:
    """Refuse a delta above 1 / (10 n) when the number of users is known."""
    delta, bound = check_delta(delta), default_delta(n_users)
    if delta > bound:
        raise ValueError(f"delta={delta:g} is above 1/(10 x {n_users} users) = {bound:.3g}: "
                         "with that many users it may fail for a user too often")
    return delta


# ---- the plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanQuery:
    target_epsilon: float | None
    noise_multiplier: float | None
    delta: float
    rounds: int
    local_steps: int
    sample_rate: float
    mechanism: str = "rdp"

    def __post_init__(self):
        check_mechanism(self.mechanism)
        check_delta(self.delta)
        check_steps(self.rounds, "rounds")
        check_steps(self.local_steps, "local_steps")
        check_target(self.target_epsilon)
        check_entry(0.0 if self.noise_multiplier is None else self.noise_multiplier,
                    self.sample_rate, 1)
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("give target_epsilon, noise_multiplier, or both")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps


def plan(q: PlanQuery, verify: bool = True) -> dict:
    """Both directions for a planned run; every epsilon from both accountants, the larger
    one stated. ``verify``: also compare the two like with like (``agrees``, ``checks``)."""
    total = q.total_steps
    out: dict = {"mechanism": q.mechanism, "delta": q.delta, "sample_rate": q.sample_rate,
                 "rounds": q.rounds, "local_steps": q.local_steps, "total_steps": total,
                 "target_epsilon": q.target_epsilon, "noise_for_target": None,
                 "epsilon_at_noise_for_target": None, "noise_multiplier": q.noise_multiplier,
                 "epsilon_for_noise": None, "opacus": {}, "independent": {}, "checks": {},
                 "agrees": True}
    checks = []
    if q.target_epsilon is not None:
        sigma = noise_for_budget(q.target_epsilon, q.delta, q.sample_rate, total, q.mechanism)
        out["noise_for_target"] = sigma
        checks.append(("epsilon_at_noise_for_target", sigma))
    if q.noise_multiplier is not None:
        checks.append(("epsilon_for_noise", q.noise_multiplier))
    for key, sigma in checks:
        history = [(sigma, q.sample_rate, total)]
        if verify:
            res = cross_check(history, q.delta, q.mechanism)
            eps = res.epsilons
            out["checks"][key] = res.note
            if not res.agrees:
                out["agrees"] = False
                log.warning("%s: the accountants disagree (sigma=%.6g, %s): %s", key, sigma,
                            q.mechanism, res.note)
        else:
            eps = both_epsilons(history, q.delta, q.mechanism)
        out[key] = eps.epsilon
        out["opacus"][key] = eps.opacus
        out["independent"][key] = eps.dp_accounting
    return out
