"""The node's privacy ledger: explicit creation, durable charges, no tolerance, no rewind."""

import json
import math

import pytest

from fedmeta.config import LocalDPConfig
from fedmeta.privacy.accounting import BudgetExceededError, independent_epsilon
from fedmeta.privacy.ledger import (HWM, LEDGER, LedgerError, PrivacyLedger, declared_population,
                                    default_delta, make_plan)


def _plan(**kw):
    dp = LocalDPConfig(enabled=True, **({"target_epsilon": 2.0, "population": 50} | kw))
    return make_plan(dp, n_users=50, users_per_step=10, planned_steps=20)


def test_the_population_is_declared_not_read_from_the_data():
    with pytest.raises(LedgerError, match="privacy.local.population"):
        make_plan(LocalDPConfig(enabled=True, target_epsilon=2.0), 36, 4, 10)
    a = make_plan(LocalDPConfig(enabled=True, noise_multiplier=1.0, population=50), 36, 4, 10)
    b = make_plan(LocalDPConfig(enabled=True, noise_multiplier=1.0, population=50), 35, 4, 10)
    assert a == b and a.sample_rate == 4 / 50 and a.delta == pytest.approx(1 / 500)
    assert [declared_population(n) for n in (1, 3, 35, 36, 50, 51, 999)] == [1, 5, 50, 50, 50,
                                                                              100, 1000]


def test_a_reset_recovers_from_a_corrupt_high_water_mark_and_never_rewinds(tmp_path):
    ledger = PrivacyLedger.create(tmp_path, "c0", _plan())
    ledger.charge(5)
    (tmp_path / HWM).write_text("garbage")
    reset = PrivacyLedger.create(tmp_path, "c0", _plan(), reset=True)
    assert reset.steps_charged == 0 and reset.seq > ledger.seq
    assert PrivacyLedger.open(tmp_path, "c0", _plan_unsolved()).seq == reset.seq


def test_default_delta_is_a_tenth_of_one_over_n():
    assert default_delta(50) == pytest.approx(1 / 500)
    assert _plan().delta == pytest.approx(1 / 500)
    assert _plan(delta=1e-6).delta == 1e-6


def test_planned_run_fits_exactly_and_one_more_step_is_refused(tmp_path):
    plan = _plan()
    ledger = PrivacyLedger.create(tmp_path, "c0", plan)
    for _ in range(4):
        ledger.charge(5)                       # the planned 20 steps
    assert ledger.epsilon() <= 2.0
    with pytest.raises(BudgetExceededError):
        ledger.charge(5)
    assert ledger.steps_charged == 20          # nothing recorded by the refused charge
    # the independent accountant agrees the spend is within the target (no tolerance)
    theirs = independent_epsilon(ledger.accountant.history, plan.delta)
    assert ledger.epsilon() == pytest.approx(theirs, rel=0.01)


def test_charges_are_durable_and_reopened_from_disk(tmp_path):
    plan = _plan()
    ledger = PrivacyLedger.create(tmp_path, "c0", plan)
    ledger.charge(5)
    again = PrivacyLedger.open(tmp_path, "c0", _plan_unsolved())
    assert again.steps_charged == 5 and again.epsilon() == pytest.approx(ledger.epsilon())
    assert json.loads((tmp_path / HWM).read_text())["seq"] == 1


def _plan_unsolved():
    dp = LocalDPConfig(enabled=True, target_epsilon=2.0, population=50)
    return make_plan(dp, n_users=50, users_per_step=10, planned_steps=20, solve=False)


def test_missing_corrupt_stale_and_foreign_ledgers_are_refused(tmp_path):
    with pytest.raises(LedgerError, match="fedmeta-node init"):
        PrivacyLedger.open(tmp_path, "c0", _plan_unsolved())
    ledger = PrivacyLedger.create(tmp_path, "c0", _plan())
    ledger.charge(5)
    old = (tmp_path / LEDGER).read_text()
    ledger.charge(5)
    (tmp_path / LEDGER).write_text(old)                       # a stale copy
    with pytest.raises(LedgerError, match="high-water mark"):
        PrivacyLedger.open(tmp_path, "c0", _plan_unsolved())
    (tmp_path / LEDGER).write_text("{ not json")
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger.open(tmp_path, "c0", _plan_unsolved())
    (tmp_path / LEDGER).unlink()
    with pytest.raises(LedgerError, match="reset-budget"):    # lost, not new: hwm remains
        PrivacyLedger.open(tmp_path, "c0", _plan_unsolved())
    fresh = PrivacyLedger.create(tmp_path / "x", "c1", _plan())
    with pytest.raises(LedgerError, match="'c1', not 'c0'"):
        PrivacyLedger.open(fresh.dir, "c0", _plan_unsolved())


def test_changed_settings_refuse_and_only_an_explicit_reset_restarts(tmp_path, caplog):
    PrivacyLedger.create(tmp_path, "c0", _plan()).charge(5)
    changed = make_plan(LocalDPConfig(enabled=True, target_epsilon=4.0, population=50), 50, 10, 20, solve=False)
    with pytest.raises(LedgerError, match="target_epsilon"):
        PrivacyLedger.open(tmp_path, "c0", changed)
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.create(tmp_path, "c0", _plan())
    reset = PrivacyLedger.create(tmp_path, "c0", _plan(), reset=True)
    assert reset.steps_charged == 0 and reset.resets == 1
    assert "RESET" in caplog.text
    # the sequence number keeps growing across a reset: old copies stay stale
    assert reset.seq >= 1


def test_a_fixed_noise_budget_without_target_still_accounts(tmp_path):
    plan = make_plan(LocalDPConfig(enabled=True, noise_multiplier=1.0, population=50), 50, 10, 20)
    assert plan.target_epsilon is None and plan.noise_multiplier == 1.0
    ledger = PrivacyLedger.create(tmp_path, "c0", plan)
    ledger.charge(100)
    assert math.isfinite(ledger.epsilon()) and ledger.epsilon() > 0
