"""Q2 (d): the DP-against-silo-size curve's cells, table and verdict (no training here)."""

import math

from bench import q2_dp_curve as q


def rec(n, dp, seed, cold, eps=None):
    return {"users": n, "dp": dp, "seed": seed, "cold": cold, "seconds": 1.0,
            "epsilon": eps, "delta": 1e-4 if dp else None}


def test_the_cohort_scales_with_the_silo_and_dp_is_the_nodes_local_dp():
    small, big = q.overrides(1_000, False), q.overrides(10_000, True)
    assert "algorithm.users_per_step=20" in small and "privacy=none" in small
    assert "algorithm.users_per_step=200" in big and "privacy=local" in big
    assert "privacy.local.target_epsilon=8.0" in big


def test_curve_keeps_the_ratio_of_means_and_the_largest_epsilon():
    records = [rec(5_000, False, s, v) for s, v in enumerate([0.10, 0.12, 0.11])]
    records += [rec(5_000, True, s, v, e) for s, v, e in zip(range(3), [0.09, 0.08, 0.10],
                                                             [7.9, 7.99, 7.95])]
    (p,) = q.curve(records)
    assert math.isclose(p["kept"], 0.09 / 0.11)
    assert p["epsilon"] == 7.99 and p["plain_seeds"] == p["dp_seeds"] == 3
    assert math.isclose(p["plain"][1], 0.01)


def test_verdict_uses_only_large_silos_and_the_worst_of_them():
    records = [rec(1_000, False, 0, 0.10), rec(1_000, True, 0, 0.01, 8.0),   # small: ignored
               rec(5_000, False, 0, 0.10), rec(5_000, True, 0, 0.085, 8.0),
               rec(10_000, False, 0, 0.10), rec(10_000, True, 0, 0.095, 8.0)]
    assert "**met**" in q.verdict(q.curve(records))
    records[3] = rec(5_000, True, 0, 0.07, 8.0)
    v = q.verdict(q.curve(records))
    assert "**missed** (by 10 points)" in v and "70% at 5,000" in v


def test_without_a_large_silo_the_target_is_not_measured_and_skips_are_listed():
    records = [rec(1_000, False, 0, 0.1), rec(1_000, True, 0, 0.09, 8.0),
               rec(5_000, False, 0, 0.1)]           # the DP run at 5,000 did not finish
    text = q.section(records, ["5,000 users DP seed 0"], [0], quick=False)
    assert "not measured" in text and "Not run: 5,000 users DP seed 0." in text
    assert "| 5000 | 100 | 0.1000 ± 0.0000 | 1 | n/a | 0 | n/a |" in text
