"""A node's privacy ledger: its user-level DP accountant, on its own disk, never on the wire.

The party user-level DP protects against is the server, so nothing the server says may
decide how much budget is left. The ledger therefore lives only in the node's state
directory and is read only from there:

* **Created explicitly.** A node without a ledger refuses to train: creating one (the
  operator's ``fedmeta-node init``/``reset-budget``, or the simulation engine when it
  starts a fresh experiment) is the only way a budget starts, and a reset is logged as a
  restart of the budget. A lost or corrupt ledger is never silently replaced by a new one.
* **Pinned settings.** The ledger records the mechanism, delta, target, clipping norm,
  sample rate and the noise multiplier solved once for the planned run. A node whose own
  privacy config no longer matches them refuses to train until the operator resets.
* **Charged before release.** A round's steps are charged, written (temporary file, fsync,
  rename) and only then trained; a crash mid-round can only over-count. A charge that would
  take epsilon past the target is refused (no tolerance), and nothing is trained.
* **High-water mark.** A second file records the highest release sequence number written.
  A ledger older than it (a restored backup, a copied-in file) is refused: replaying an old
  ledger would let the node spend its budget again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fedmeta.atomic import write_json
from fedmeta.config import LocalDPConfig
from fedmeta.privacy.accounting import BudgetExceededError, UserLevelAccountant
from fedmeta.privacy.planning import noise_for_budget

log = logging.getLogger(__name__)

LEDGER, HWM = "privacy_ledger.json", "privacy_ledger.hwm"
FORMAT = 1


class LedgerError(RuntimeError):
    """The node's privacy state cannot be trusted; the node refuses to train."""


def declared_population(n_users: int) -> int:
    """The population a launcher declares for a node holding ``n_users``: the next value of the
    1-2-5 series (1, 2, 5, 10, 20, 50, ...) at or above it. Adding or removing one user changes
    it only when the count crosses a series value, and a declared population above the real
    count only lowers the sampling rate (the accounting holds for any declared value)."""
    value = 1
    while True:
        for m in (1, 2, 5):
            if m * value >= n_users:
                return m * value
        value *= 10


def default_delta(n_users: int) -> float:
    """delta = 1 / (10 n) for the node's own n: the probability of a total failure of the
    guarantee must be far below the chance of picking any one of its n users."""
    return 1.0 / (10.0 * n_users)


@dataclass(frozen=True)
class DPPlan:
    """The settings a budget is created with; all from the node's own config and data."""

    mechanism: str
    delta: float
    target_epsilon: float | None
    max_grad_norm: float
    sample_rate: float
    noise_multiplier: float

    def as_dict(self) -> dict:
        return {"mechanism": self.mechanism, "delta": self.delta,
                "target_epsilon": self.target_epsilon, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier}


def make_plan(dp: LocalDPConfig, n_users: int, users_per_step: int, planned_steps: int,
              solve: bool = True) -> DPPlan:
    """``solve=False``: leave sigma unsolved (NaN) for a target; enough to check a ledger.

    The sampling rate and the default delta come from the *declared* population
    (``privacy.local.population``), a public setting of the node, so nothing the node
    releases is a function of how many users its silo really holds; without a declaration
    they fall back to ``n_users`` (logged: the replies then reveal that count)."""
    if n_users < 1:
        raise LedgerError("local DP needs at least one training user")
    if dp.population is None:
        raise LedgerError("privacy.local.population: a DP node must declare its (public) number "
                          "of training users; q, the default delta and the noise's divisor follow "
                          "it, so that no released value is a function of the real count "
                          f"(this node holds {n_users}; see declared_population())")
    population = dp.population
    delta = dp.delta if dp.delta is not None else default_delta(population)
    q = min(1.0, users_per_step / population)
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    elif solve:
        sigma = noise_for_budget(dp.target_epsilon, delta, q, planned_steps, dp.mechanism)
    else:
        sigma = math.nan
    return DPPlan(dp.mechanism, float(delta), dp.target_epsilon, float(dp.max_grad_norm),
                  float(q), sigma)


class PrivacyLedger:
    def __init__(self, directory: Path, client_id: str, plan: DPPlan,
                 accountant: UserLevelAccountant, seq: int, resets: int):
        self.dir, self.client_id, self.plan = Path(directory), client_id, plan
        self.accountant, self.seq, self.resets = accountant, seq, resets

    # ---- creation ----------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, client_id: str, plan: DPPlan,
               reset: bool = False) -> "PrivacyLedger":
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        exists = (d / LEDGER).exists() or (d / HWM).exists()
        if exists and not reset:
            raise LedgerError(f"{d}: a privacy ledger already exists; resetting it restarts the "
                              "budget and must be asked for explicitly (fedmeta-node reset-budget)")
        resets, hwm_seq = 0, 0
        if exists:
            resets = cls._peek_resets(d) + 1
            try:
                hwm_seq = cls._read_hwm(d)
            except LedgerError as err:     # a reset must recover from a corrupt mark too
                log.warning("%s; the reset continues from the ledger's own count", err)
            # the sequence only ever grows, across resets as well: no copy from before the
            # reset can pass for a newer one
            hwm_seq = max(hwm_seq, cls._peek_seq(d), int(time.time()))
            log.warning("client %s: privacy budget RESET in %s by the operator: earlier releases "
                        "are no longer counted (reset #%d)", client_id, d, resets)
        acc = UserLevelAccountant(plan.mechanism, plan.delta, plan.target_epsilon)
        ledger = cls(d, client_id, plan, acc, hwm_seq, resets)
        ledger._persist()
        log.info("client %s: new privacy budget: %s", client_id, plan.as_dict())
        return ledger

    @staticmethod
    def _peek_resets(d: Path) -> int:
        try:
            return int(json.loads((d / LEDGER).read_text()).get("resets", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    @staticmethod
    def _peek_seq(d: Path) -> int:
        try:
            return int(json.loads((d / LEDGER).read_text()).get("seq", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            return 0

    @staticmethod
    def _read_hwm(d: Path) -> int:
        try:
            return int(json.loads((d / HWM).read_text())["seq"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"{d / HWM}: corrupt high-water mark ({err}); refusing to train "
                              "(fedmeta-node reset-budget restarts the budget)") from None

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, client_id: str, expected: DPPlan) -> "PrivacyLedger":
        d = Path(directory)
        path = d / LEDGER
        hint = ("initialise the node's budget with 'fedmeta-node init NODE_FILE'"
                if not (d / HWM).exists() else
                "the ledger was lost: only 'fedmeta-node reset-budget NODE_FILE' (which restarts "
                "the budget, logged) lets this node train again")
        if not path.exists():
            raise LedgerError(f"{path}: no privacy ledger; refusing to train ({hint})")
        try:
            raw = json.loads(path.read_text())
            plan = DPPlan(**raw["plan"])
            acc = UserLevelAccountant.from_state_dict(raw["accountant"])
            seq, resets, owner = int(raw["seq"]), int(raw.get("resets", 0)), str(raw["client_id"])
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r} is not {FORMAT}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"{path}: corrupt privacy ledger ({err}); refusing to train "
                              "(fedmeta-node reset-budget restarts the budget, logged)") from None
        if owner != client_id:
            raise LedgerError(f"{path}: ledger of client {owner!r}, not {client_id!r}")
        hwm = cls._read_hwm(d)
        if seq < hwm:
            raise LedgerError(f"{path}: ledger at release {seq} is older than this node's "
                              f"high-water mark {hwm} (a stale copy); refusing to train")
        changed = {k: (v, expected.as_dict()[k]) for k, v in plan.as_dict().items()
                   if k != "noise_multiplier" and not _same(v, expected.as_dict()[k])}
        if expected.target_epsilon is None and not _same(plan.noise_multiplier,
                                                          expected.noise_multiplier):
            changed["noise_multiplier"] = (plan.noise_multiplier, expected.noise_multiplier)
        if changed:
            raise LedgerError(f"{path}: the node's privacy settings differ from those its budget "
                              f"was created with ({changed}); refusing to train "
                              "(fedmeta-node reset-budget to start a new budget)")
        if acc.mechanism != plan.mechanism or acc.delta != plan.delta:
            raise LedgerError(f"{path}: accountant and plan disagree; corrupt ledger")
        return cls(d, client_id, plan, acc, seq, resets)

    # ---- spending ----------------------------------------------------------------------
    def can_afford(self, steps: int) -> bool:
        return self.accountant.can_afford(self.plan.noise_multiplier, self.plan.sample_rate, steps)

    def charge(self, steps: int) -> None:
        """Record ``steps`` DP steps durably, before any of them is taken.

        Raises :class:`BudgetExceededError` (nothing recorded) past the target."""
        self.accountant.step(self.plan.noise_multiplier, self.plan.sample_rate, steps)
        self.seq += 1
        self._persist()

    @property
    def steps_charged(self) -> int:
        return self.accountant.total_steps

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def _persist(self) -> None:
        write_json(self.dir / LEDGER, {"format": FORMAT, "client_id": self.client_id,
                                   "plan": self.plan.as_dict(),
                                   "accountant": self.accountant.state_dict(), "seq": self.seq,
                                   "resets": self.resets, "written_at": time.time()})
        write_json(self.dir / HWM, {"seq": self.seq})


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


__all__ = ["BudgetExceededError", "DPPlan", "LedgerError", "PrivacyLedger", "default_delta",
           "make_plan"]
