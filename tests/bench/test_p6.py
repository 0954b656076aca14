"""P6 bench logic: the federation overrides, silo sizes and the tables built from cell results.
No timings or memory figures are asserted (they belong to the benchmark)."""

from __future__ import annotations

import json

import pytest

from bench import p6_node
from bench.p6_node import (breakdown_rows, contrast_rows, node_rows, overrides, silo_sizes,
                           spread, verdicts)


def _phase(rss, hwm, s):
    return {"rss_mb": rss, "hwm_mb": hwm, "s": s}


def _node(peak, dp):
    phases = {"imports": _phase(470, 470, 1), "silo": _phase(500, 500, 2),
              "node": _phase(510, 510, 3), "train": _phase(700, peak, 7),
              "eval": _phase(700, peak + 5, 8)}
    if dp:
        phases["budget"] = _phase(505, 506, 1.5)
    return {"phases": phases, "train_users": 400, "cold_users": 100, "interactions": 15000,
            "silo_frames_mb": 1.2, "task_tensors_mb": 0.8, "model_mb": 1.3}


def _res(peaks):
    fed = {}
    for n, peak in peaks.items():
        fed[str(n)] = {"partition": {"hwm_mb": 500 + n, "s": 10.0}, "silo_users": [480, 500],
                       "plain": _node(peak, False), "dp": _node(peak + 10, True),
                       "whole": {"phases": {"node": _phase(520 + n, 520 + n, 4),
                                            "eval": _phase(700, peak + n, 9)}},
                       "old": {"built_hwm_mb": 560.0 + n, "hwm_mb": 800.0 + n}}
    return {"users_per_silo": 500, "baseline": {"python": {"rss_mb": 15.0}}, "fed": fed,
            "code": "abc1234"}


def test_overrides_split_silos_evenly_over_domains():
    ovr = overrides(8, 500)
    assert "data.synthetic.ecommerce_users=2000" in ovr
    assert "data.synthetic.social_users=2000" in ovr
    clients = next(o for o in ovr if o.startswith("data.clients="))
    assert clients.count("n_clients:4") == 2 and "new_clients:0" in clients
    assert "algorithm.local_steps=1" in overrides(2, 40, quick=True)
    for bad in (1, 3):
        with pytest.raises(ValueError):
            overrides(bad, 500)


def test_silo_sizes_count_training_and_cold_users(tmp_path):
    for name, train, cold in (("a", 3, 1), ("b", 5, 0)):
        d = tmp_path / "silos" / name
        d.mkdir(parents=True)
        (d / "silo.json").write_text(json.dumps({"train_users": ["u"] * train,
                                                 "cold_users": ["c"] * cold}))
    assert sorted(silo_sizes(tmp_path)) == [4, 5]


def test_node_rows_in_silo_order_with_phase_differences():
    rows = node_rows(_res({32: 800.0, 2: 790.0}))
    assert [r[:2] for r in rows] == [[2, "none"], [2, "local"], [32, "none"], [32, "local"]]
    first = rows[0]
    assert first[2] == 500 and first[3] == 400        # no silo_users: training + cold
    assert first[4] == 470 and first[5] == 510
    assert first[6] == 790.0 and first[7] == 795.0
    assert first[8] == pytest.approx(4) and first[9] == pytest.approx(1)


def test_failed_cell_is_a_row_not_an_exception():
    res = _res({2: 790.0})
    res["fed"]["2"]["plain"] = {"error": "timeout after 900s"}
    rows = node_rows(res)
    assert "timeout" in rows[0][2] and len(rows[0]) == 10
    assert [r[1] for r in breakdown_rows(res)] == ["local"]


def test_breakdown_separates_budget_load_round_and_eval():
    plain, dp = breakdown_rows(_res({2: 790.0}))
    assert plain[3] == 0 and plain[4] == 40          # no budget; silo + node = 510 - 470
    assert dp[3] == 36 and dp[4] == 5                # budget hwm 506 - 470; node 510 - 505
    assert plain[8] == 790.0 - 510 and plain[9] == 5.0
    assert dp[8] == 800.0 - 510


def test_contrast_rows_and_missing_old_design():
    res = _res({2: 790.0, 8: 795.0})
    del res["fed"]["8"]["old"]
    rows = contrast_rows(res)
    assert rows[0][:6] == [2, 1000, 480, 500, 502, 10.0]
    assert rows[0][6:] == [522, 792.0, 795.0, 562.0, 802.0]
    assert rows[1][-2:] == ["not run", "not run"]


def test_spread_and_verdicts():
    assert spread([100.0, 104.0]) == pytest.approx(0.04)
    assert spread([]) != spread([])                   # nan
    flat = verdicts(_res({2: 790.0, 8: 795.0, 32: 800.0}))
    assert all("**met**" in v for v in flat[:2])
    grown = verdicts(_res({2: 790.0, 32: 1000.0}))
    assert "**missed**" in grown[0] and "**missed**" in grown[1]
    assert "fewer than two" in verdicts(_res({2: 790.0}))[0]
    where = next(v for v in flat if v.startswith("Where the peak goes"))
    assert "32 silos, 805 MB" in where and "imports 470 MB" in where and "3.3 MB" in where
    whole = next(v for v in flat if v.startswith("Holding the whole federation"))
    assert "522 -> 552 MB from 2 to 32 silos (+30 MB" in whole and "510 -> 510 MB" in whole


def test_run_builds_a_section_from_measurements(monkeypatch):
    monkeypatch.setattr(p6_node, "measure", lambda quick, echo=print: _res({2: 790.0, 8: 795.0}))
    text = p6_node.run(True, echo=lambda s: None)
    assert text.startswith("## P6 Per-node memory")
    assert "abc1234" in text and "fedmeta-bench --only P6" in text
    assert text.count("\n| 2 | none |") == 2          # node table and breakdown


# ---- P4 (silo scale): the same kind of checks on its tables ----------------------------------
from bench import p4_scale  # noqa: E402


def _combo(algo, dp, t, users, profile):
    return {"algorithm": algo, "dp": dp, "round_s": [t, t * 3], "round_cpu_s": [t / 2, t],
            "sampled": [users] * 2,
            "round_peak_mb": 50.0, "budget_s": 1.0 if dp else 0.0, "node_s": 0.5,
            "profile": profile, "steps": 2}


def _p4(times):
    """times: silo size -> round seconds of (fedavg, no DP); DP rounds take twice as long."""
    res = {}
    for n, t in times.items():
        prof = {"tasks.py:1(sample)": t / 2 * n / 1000, "base.py:2(step)": 0.1}
        res[n] = {"build": {"users": n, "train_users": int(n * 0.8), "interactions": n * 30,
                            "generate_s": 1.0, "cut_s": 0.5, "write_s": 0.25,
                            "peak_rss_mb": 600.0, "client": "ecommerce-0"},
                  "node": {"read_s": 0.1, "tasks_s": 2.0, "peak_load_mb": 550.0,
                           "rss_loaded_mb": 540.0,
                           "combos": [_combo("fedavg", False, t, 64, prof),
                                      _combo("fedavg", True, 2 * t, 60, prof)]}}
    return res


def test_p4_overrides_fix_sampled_users_across_sizes():
    small, large = p4_scale.overrides(1000), p4_scale.overrides(100_000)
    assert "data.synthetic.ecommerce_users=100000" in large
    same = [o for o in small if not o.startswith("data.synthetic.ecommerce_users")]
    assert same == [o for o in large if not o.startswith("data.synthetic.ecommerce_users")]
    assert f"algorithm.users_per_step={p4_scale.USERS_PER_STEP}" in small
    assert len(p4_scale.combos()) == 6


def test_p4_rows_use_the_timed_round():
    rows = p4_scale.round_rows(_p4({1000: 1.0, 100_000: 1.0}))
    fedavg = [r for r in rows if r[1] == "fedavg" and r[2] == "none"]
    assert [r[0] for r in fedavg] == [1000, 100_000]
    assert fedavg[0][3:9] == ["-", 64, 1.0, 0.5, 64.0, 500 / 64]     # wall and CPU time
    data = p4_scale.data_rows(_p4({1000: 1.0}))
    assert data[0][:7] == [1000, 1000, 800, 30000, 1.0, 0.75, 600.0]


def test_p4_failed_build_and_node_rows():
    res = _p4({1000: 1.0, 10_000: 1.0})
    res[10_000]["node"] = {"error": "timeout after 2400s"}
    res[1000] = {"build": {"error": "exit 1: boom"}}       # no node without its silo
    rows = p4_scale.data_rows(res)
    assert rows[0][1].startswith("failed") and "timeout" in rows[1][7]
    assert all(len(r) == 11 for r in rows)
    assert p4_scale.round_rows(res) == []


def test_p4_verdicts_flag_growth_and_name_the_function():
    flat = p4_scale.verdicts(_p4({1000: 1.0, 100_000: 1.1}))
    assert len(flat) == 2 and all("**met**" in v for v in flat)
    grown = p4_scale.verdicts(_p4({1000: 1.0, 100_000: 5.0}))
    assert all("**missed**" in v for v in grown)
    assert "tasks.py:1(sample)" in grown[0]
    fns = p4_scale.grown_functions(_p4({1000: 1.0, 100_000: 5.0}), "fedavg", False)
    assert fns[0][0] == "tasks.py:1(sample)" and fns[0][2] > fns[0][1]


def test_p4_profile_rows_per_combination():
    rows = p4_scale.profile_rows(_p4({1000: 1.0, 100_000: 5.0}), top=1)
    assert rows == [["fedavg", "none", "`tasks.py:1(sample)`", 0.5, 250.0],
                    ["fedavg", "local", "`tasks.py:1(sample)`", 0.5, 250.0]]


def test_p4_federation_overrides_and_rows():
    iid = p4_scale.federation_overrides("iid100")
    assert sum(o.count("n_clients:50") for o in iid) == 2 and "privacy=none" in iid
    one = " ".join(p4_scale.federation_overrides("user1000"))
    assert one.count("scheme:user") == 2 and "ecommerce_users=625" in one
    rows = p4_scale.federation_rows({
        "iid100": {"clients": 100, "training_clients": 98, "users_per_client": 16,
                   "build_s": 30.0, "round_s": [10.0, 25.0], "round_cpu_s": [8.0, 20.0],
                   "rss_built_mb": 900.0,
                   "peak_rss_mb": 1000.0},
        "user1000": {"error": "timeout after 2400s"},
        "partial": {"clients": 10, "training_clients": 8, "users_per_client": 1,
                    "build_s": 5.0, "round_s": [2.0], "rss_built_mb": 1.0, "peak_rss_mb": 2.0,
                    "error": "timeout after 60s"}})
    assert rows[0] == ["iid100", 100, 98, 16, 30.0, 300.0, 10.0, 8.0, 25.0, 900.0, 1000.0]
    assert rows[1][1].startswith("failed") and len(rows[1]) == 11
    assert rows[2][6] == 2.0 and rows[2][8] == "not reached: timeout after 60s"


def test_p4_run_builds_a_section(monkeypatch):
    feds = {"iid100": {"error": "not run"}}
    monkeypatch.setattr(p4_scale, "measure", lambda quick, echo=print: {
        "silos": _p4({1000: 1.0, 10_000: 1.0}), "federations": feds})
    text = p4_scale.run(False, echo=lambda s: None)
    assert text.startswith("## P4 Silo scale") and "fedmeta-bench --only P4" in text
    assert text.count("| fedavg | local |") == 2 + 2      # round table, profile table


def test_step_text_names_the_catalogue_and_allocators():
    res = _res({2: 790.0})
    assert "not run" in p6_node.step_text(res)
    res["step"] = {"algorithm": "fomaml", "users": 32, "cand_shape": [32, 600, 12],
                   "step_peak_mb": 300.0, "top_ops": [["aten::mul", 600.0, 300]], "hidden": 64,
                   "cand_embeddings_mb": 56.25}
    text = p6_node.step_text(res)
    assert "32 x 600 items x 12 tokens" in text and "56 MB" in text and "`aten::mul`" in text


def test_p4_one_off_text_compares_smallest_and_largest_silo():
    res = _p4({1000: 1.0, 100_000: 1.0})
    res[100_000]["node"]["tasks_s"] = 200.0
    text = p4_scale.one_off_text(res)
    assert "2.0 s at 1,000 users and 200 s at 100,000 (x100 for x100 the users)" in text
    assert p4_scale.one_off_text(_p4({1000: 1.0})) == ""
