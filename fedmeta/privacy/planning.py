"""Answer privacy questions before training: which noise buys a budget, which budget a noise.

The noise multiplier for a target is solved *once* for the whole planned run (all rounds x
local steps at the client's sample rate), never per round: re-solving each round for the
remaining budget would give a different sigma every time and make the spend order-dependent.
Every solved sigma is re-checked through the same epsilon computation the accountant uses,
so a planned run is exactly affordable by a :class:`~fedmeta.privacy.accounting.UserLevelAccountant`
with the same target (its last step included).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from fedmeta.privacy.accounting import (PRV_EPS_ERROR, RDP_ORDERS, agrees, check_delta,
                                        check_entry, check_mechanism, check_steps,
                                        check_target, history_epsilon, independent_epsilon)

log = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.005     # the solved sigma spends within this much of the target


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


def epsilon_for_noise(noise_multiplier: float, delta: float, sample_rate: float,
                      total_steps: int, mechanism: str = "rdp") -> float:
    entry = check_entry(noise_multiplier, sample_rate, check_steps(total_steps, "total_steps"))
    return history_epsilon([entry], check_delta(delta), check_mechanism(mechanism))


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float,
                     total_steps: int, mechanism: str = "rdp") -> float:
    target = check_target(target_epsilon)
    if target is None:
        raise ValueError("target_epsilon is required to solve for a noise multiplier")
    delta = check_delta(delta)
    mechanism = check_mechanism(mechanism)
    _, q, steps = check_entry(1.0, sample_rate, check_steps(total_steps, "total_steps"))
    extra = {"alphas": list(RDP_ORDERS)} if mechanism == "rdp" else {"eps_error": PRV_EPS_ERROR}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # edge-order notes during the search, not results
            sigma = float(get_noise_multiplier(
                target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                accountant=mechanism, epsilon_tolerance=EPSILON_TOLERANCE, **extra))
    except ValueError as e:
        raise ValueError(f"target_epsilon={target} at delta={delta} is unreachable for "
                         f"{steps} steps at sample_rate={q} ({mechanism}): {e}") from None
    eps = epsilon_for_noise(sigma, delta, q, steps, mechanism)
    if not (math.isfinite(sigma) and sigma > 0 and eps <= target):
        raise RuntimeError(f"noise solver returned sigma={sigma} spending epsilon={eps} > "
                           f"target {target}; refusing to use it")
    log.info("noise_multiplier %.4f spends epsilon %.4f of %.4f (delta=%.2e, q=%.4g, %d steps, "
             "%s)", sigma, eps, target, delta, q, steps, mechanism)
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


def plan(q: PlanQuery) -> dict:
    """Both directions for a planned run, each with its independent (dp_accounting) value."""
    total = q.total_steps
    out: dict = {"mechanism": q.mechanism, "delta": q.delta, "sample_rate": q.sample_rate,
                 "rounds": q.rounds, "local_steps": q.local_steps, "total_steps": total,
                 "target_epsilon": q.target_epsilon, "noise_for_target": None,
                 "epsilon_at_noise_for_target": None, "noise_multiplier": q.noise_multiplier,
                 "epsilon_for_noise": None, "independent": {}, "agrees": True}
    checks = []
    if q.target_epsilon is not None:
        sigma = noise_for_budget(q.target_epsilon, q.delta, q.sample_rate, total, q.mechanism)
        out["noise_for_target"] = sigma
        out["epsilon_at_noise_for_target"] = epsilon_for_noise(sigma, q.delta, q.sample_rate,
                                                               total, q.mechanism)
        checks.append(("epsilon_at_noise_for_target", sigma))
    if q.noise_multiplier is not None:
        out["epsilon_for_noise"] = epsilon_for_noise(q.noise_multiplier, q.delta, q.sample_rate,
                                                     total, q.mechanism)
        checks.append(("epsilon_for_noise", q.noise_multiplier))
    for key, sigma in checks:
        theirs = independent_epsilon([(sigma, q.sample_rate, total)], q.delta, q.mechanism)
        out["independent"][key] = theirs
        if not agrees(out[key], theirs, q.mechanism):
            out["agrees"] = False
            log.warning("%s: opacus gives %.6g, dp_accounting %.6g (sigma=%.4g, %s)", key,
                        out[key], theirs, sigma, q.mechanism)
    return out
