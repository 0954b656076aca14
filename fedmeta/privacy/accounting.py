"""User-level privacy accounting that survives rounds and restarts.

A client's DP-SGD run is a sequence of Poisson-subsampled Gaussian steps; its guarantee is
the composition of *all* of them, across every round and every process restart. The
accountant therefore stores nothing but the composable history ``[(sigma, q, steps), ...]``
(Opacus's own history format, consecutive identical entries merged) plus delta, the
mechanism and the target, all as plain JSON-able values. Epsilon is always recomputed from
that history by both Opacus and dp_accounting and the larger figure is used
(:func:`conservative_epsilon`), so a restored accountant reports exactly what an
uninterrupted one would, and no budget check rests on the tighter of two analyses.

The accountant refuses to overspend: with a target set, :meth:`UserLevelAccountant.step`
raises *before* recording a step that would push epsilon past the target, so the caller
can discard the not-yet-released result. Because the true epsilon of a prefix of an
approved run can never exceed the run's epsilon, steps inside a run already approved by
:meth:`~UserLevelAccountant.can_afford` are recorded without recomputing (PRV is slow).

RDP orders. Opacus's default alphas stop at 63, which makes small epsilons loose, and
dp_accounting's defaults are those alphas plus 11, 128, 256, 512 and 1024. Both sides use
:data:`RDP_ORDERS`, the union (identical to dp_accounting's ``DEFAULT_RDP_ORDERS``), so the
independent check compares the same optimisation over the same orders. The two libraries
then agree to floating-point precision at integer orders; at fractional orders
dp_accounting uses a conservative series (sometimes dropping an order), so its epsilon is
slightly *larger* when a fractional order is optimal: within 1% for epsilon up to about
8, more for very large epsilons. Opacus's fractional-order values match direct numerical
integration of the Renyi divergence.

The independent check for PRV is dp_accounting's PLD accountant: both are numerically tight,
and PRV reports an upper bound about ``PRV_EPS_ERROR`` above the estimate.
"""

from __future__ import annotations

import logging
import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

log = logging.getLogger(__name__)

MECHANISMS = ("rdp", "prv")
RDP_ORDERS: tuple[float, ...] = tuple(sorted(
    set(RDPAccountant.DEFAULT_ALPHAS) | {11, 128, 256, 512, 1024}))
PRV_EPS_ERROR = 0.01          # Opacus's default; planning and accounting must use the same
INDEPENDENT_RTOL = 0.01
STATE_FORMAT = 1

Entry = tuple[float, float, int]


class BudgetExceededError(RuntimeError):
    """A step was refused because it would take epsilon past the target."""


# ---- validation -------------------------------------------------------------------------
def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_mechanism(mechanism: Any) -> str:
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {', '.join(MECHANISMS)}; got {mechanism!r}")
    return mechanism


def check_delta(delta: Any) -> float:
    if delta is None:
        raise ValueError("delta is required (it must be in (0, 1))")
    d = _real("delta", delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def check_target(target_epsilon: Any) -> float | None:
    if target_epsilon is None:
        return None
    t = _real("target_epsilon", target_epsilon)
    if t <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    return t


def check_steps(steps: Any, name: str = "steps") -> int:
    if isinstance(steps, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    try:
        n = operator.index(steps)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return n


def check_entry(noise_multiplier: Any, sample_rate: Any, steps: Any) -> Entry:
    sigma = _real("noise_multiplier", noise_multiplier)
    if sigma < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    q = _real("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return sigma, q, check_steps(steps)


def append_entry(history: Sequence[Entry], entry: Entry) -> list[Entry]:
    """History plus one entry, merged into the last one when (sigma, q) are identical."""
    out = list(history)
    if out and out[-1][:2] == entry[:2]:
        out[-1] = (entry[0], entry[1], out[-1][2] + entry[2])
    else:
        out.append(entry)
    return out


# ---- epsilon ----------------------------------------------------------------------------
def history_epsilon(history: Sequence[Entry], delta: float, mechanism: str = "rdp") -> float:
    """Epsilon of a composed history at ``delta``: the single place epsilon is computed."""
    check_mechanism(mechanism)
    delta = check_delta(delta)
    history = [check_entry(*h) for h in history]
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf                     # a noiseless step releases the data itself
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mechanism == "rdp":
            eps = acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))
        else:
            eps = acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
    for w in caught:        # e.g. "optimal order is the largest alpha": looser, not unsafe
        log.debug("opacus %s accountant: %s", mechanism, w.message)
    eps = float(eps)
    if math.isnan(eps):
        raise ArithmeticError(f"{mechanism} accountant returned NaN for history {history}")
    # a negative bound still certifies (0, delta)-DP
    return max(0.0, eps)


def independent_epsilon(history: Sequence[Sequence[float]], delta: float,
                        mechanism: str = "rdp") -> float:
    """The same epsilon computed with Google's dp_accounting, to cross-check Opacus.

    RDP uses dp_accounting's RDP accountant on :data:`RDP_ORDERS`; PRV is checked against
    dp_accounting's PLD accountant (dp_accounting has no PRV accountant).
    """
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    check_mechanism(mechanism)
    delta = check_delta(delta)
    entries = [check_entry(*h) for h in history]
    if not entries:
        return 0.0
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        for sigma, q, n in entries])
    acc = RdpAccountant(orders=list(RDP_ORDERS)) if mechanism == "rdp" else PLDAccountant()
    # dp_accounting logs (through absl) each fractional order whose series it cannot sum and
    # then leaves that order out: fewer orders can only raise its epsilon, never lower it,
    # so the note is dropped rather than printed dozens of times per round
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def conservative_epsilon(history: Sequence[Sequence[float]], delta: float,
                         mechanism: str = "rdp") -> float:
    """The larger of Opacus's and dp_accounting's epsilon for the same history: what every
    budget check and every report uses, so no figure rests on the tighter of two analyses."""
    ours = history_epsilon(history, delta, mechanism)
    if math.isinf(ours) or not history:
        return ours
    return max(ours, max(0.0, independent_epsilon(history, delta, mechanism)))


def agrees(ours: float, independent: float, mechanism: str = "rdp") -> bool:
    """Whether our epsilon and the independent one match within the documented tolerance."""
    check_mechanism(mechanism)
    if math.isinf(ours) or math.isinf(independent):
        return ours == independent
    slack = INDEPENDENT_RTOL * max(abs(ours), abs(independent))
    if mechanism == "prv":
        slack += 2 * PRV_EPS_ERROR          # PRV's upper bound sits ~eps_error above PLD
    return abs(ours - independent) <= slack


# ---- the accountant ---------------------------------------------------------------------
class UserLevelAccountant:
    """Wraps an Opacus accountant; cumulative across rounds/restarts; refuses to overspend."""

    def __init__(self, mechanism: str = "rdp", delta: float | None = None,
                 target_epsilon: float | None = None):
        self.mechanism = check_mechanism(mechanism)
        self.delta = check_delta(delta)
        self.target_epsilon = check_target(target_epsilon)
        self._history: list[Entry] = []
        self._approved: list[Entry] = []     # longest history known to be within target
        self._memo: dict[tuple[Entry, ...], float] = {}

    def __repr__(self) -> str:
        return (f"UserLevelAccountant(mechanism={self.mechanism!r}, delta={self.delta!r}, "
                f"target_epsilon={self.target_epsilon!r}, steps={self.total_steps})")

    @property
    def history(self) -> list[Entry]:
        return list(self._history)

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self._history)

    def _epsilon_of(self, history: list[Entry]) -> float:
        key = tuple(history)
        if key not in self._memo:
            if len(self._memo) >= 16:
                self._memo.clear()
            self._memo[key] = conservative_epsilon(history, self.delta, self.mechanism)
        return self._memo[key]

    def _within_approved(self, history: list[Entry]) -> bool:
        """True if ``history`` is a prefix (in steps) of the approved history."""
        k = len(history)
        if k == 0 or k > len(self._approved) or history[:-1] != self._approved[:k - 1]:
            return False
        last, ref = history[-1], self._approved[k - 1]
        return last[:2] == ref[:2] and last[2] <= ref[2]

    def _approve(self, history: list[Entry]) -> None:
        if not self._within_approved(history):
            self._approved = list(history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        new = append_entry(self._history, check_entry(noise_multiplier, sample_rate, steps))
        if self.target_epsilon is not None and not self._within_approved(new):
            eps = self._epsilon_of(new)
            if not eps <= self.target_epsilon:
                raise BudgetExceededError(
                    f"refusing {steps} step(s) at noise_multiplier={noise_multiplier}, "
                    f"sample_rate={sample_rate}: epsilon would reach {eps:.4g} > target "
                    f"{self.target_epsilon:.4g} (delta={self.delta:.3g}, {self.mechanism})")
            self._approve(new)
        self._history = new

    def epsilon(self) -> float:
        return self._epsilon_of(self._history)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return self._epsilon_of(
            append_entry(self._history, check_entry(noise_multiplier, sample_rate, steps)))

    def can_afford(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        new = append_entry(self._history, check_entry(noise_multiplier, sample_rate, steps))
        if self.target_epsilon is None or self._within_approved(new):
            return True
        if self._epsilon_of(new) <= self.target_epsilon:
            self._approve(new)
            return True
        return False

    # ---- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "mechanism": self.mechanism, "delta": self.delta,
                "target_epsilon": self.target_epsilon,
                "history": [[sigma, q, n] for sigma, q, n in self._history]}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "UserLevelAccountant":
        if not isinstance(state, Mapping):
            raise ValueError(f"accountant state must be a mapping, got {type(state).__name__}")
        required = {"mechanism", "delta", "target_epsilon", "history"}
        missing, unknown = required - set(state), set(state) - required - {"format"}
        if missing or unknown:
            raise ValueError(f"accountant state: missing keys {sorted(missing)}, "
                             f"unknown keys {sorted(unknown)}")
        if state.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"accountant state: format {state['format']!r} is not "
                             f"{STATE_FORMAT}, written by an incompatible version")
        acc = cls(state["mechanism"], state["delta"], state["target_epsilon"])
        raw = state["history"]
        if isinstance(raw, np.ndarray):
            if raw.size and (raw.ndim != 2 or raw.shape[1] != 3):
                raise ValueError(f"accountant state: history array must have shape (n, 3), "
                                 f"got {raw.shape}")
            raw = raw.reshape(-1, 3).tolist()
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ValueError(f"accountant state: history must be a list of "
                             f"[noise_multiplier, sample_rate, steps], got {type(raw).__name__}")
        history: list[Entry] = []
        for i, item in enumerate(raw):
            if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
                raise ValueError(f"accountant state: history[{i}] must be "
                                 f"[noise_multiplier, sample_rate, steps], got {item!r}")
            sigma, q, n = item
            if isinstance(n, (float, np.floating)) and float(n).is_integer():
                n = int(n)                   # numpy / float storage of a step count
            try:
                history = append_entry(history, check_entry(sigma, q, n))
            except ValueError as e:
                raise ValueError(f"accountant state: history[{i}]: {e}") from None
        acc._history = history
        log.debug("restored %s accountant: %d steps in %d segments", acc.mechanism,
                  acc.total_steps, len(history))
        return acc
