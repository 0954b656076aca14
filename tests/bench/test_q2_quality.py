"""Q2's verdicts are computed from the table, so each target can be met, missed or unmeasured."""

import math

from bench.q2_quality import _peer_records, summarise, verdicts


def _rec(method, seed, cold, new, warm):
    return {"method": method, "seed": seed, "cold/ndcg@10": cold, "new-client/ndcg@10": new,
            "warm/ndcg@10": warm}


def test_summary_is_mean_and_sample_std_per_population():
    s = summarise([_rec("fedavg", 0, 0.1, 0.2, 0.3), _rec("fedavg", 1, 0.3, 0.2, float("nan"))])
    mean, sd = s["fedavg"]["cold"]
    assert math.isclose(mean, 0.2) and math.isclose(sd, math.sqrt(0.02))
    assert s["fedavg"]["warm"] == (0.3, 0.0) and s["fedavg"]["seeds"] == 2
    # before adaptation: its own columns; a row that never reported it (the peer) is nan
    assert all(math.isnan(v) for v in s["fedavg"]["before/cold"])
    s = summarise([{**_rec("reptile", 0, 0.2, 0.2, 0.2), "before/cold/ndcg@10": 0.25}])
    assert s["reptile"]["before/cold"] == (0.25, 0.0) and s["reptile"]["cold"] == (0.2, 0.0)


def test_targets_a_and_b_follow_the_numbers():
    recs = [_rec("popularity", s, 0.10, 0.10, 0.10) for s in (0, 1, 2)]
    recs += [_rec("item-knn", s, 0.12, 0.05, 0.20) for s in (0, 1, 2)]
    recs += [_rec("fedavg", s, 0.10 + 0.001 * s, 0.11, 0.15) for s in (0, 1, 2)]
    recs += [_rec("reptile", s, 0.13 + 0.001 * s, 0.11, 0.15) for s in (0, 1, 2)]
    out = "\n".join(verdicts("synthetic", summarise(recs)))
    assert "(a) cold: best federated learner reptile" in out and "**met**" in out
    assert "(a) warm" in out and "**missed**" in out          # 0.15 < item-knn's 0.20
    assert "(b) cold: best meta-learner reptile" in out
    b = [line for line in out.splitlines() if line.startswith("(b)")][0]
    assert b.endswith("**met**")
    no_meta = "\n".join(verdicts("synthetic", summarise(recs[:9])))
    assert "(b) not measured" in no_meta


def test_target_c_needs_the_peer_and_the_centralised_rows():
    recs = [_rec("centralised", 0, 0.050, 0.0, 0.0), _rec("fedavg", 0, 0.040, 0.0, 0.0)]
    out = verdicts("ml100k", summarise(recs))
    assert "not measured" in out[0] and out[1].endswith("**missed**")     # 0.040 < 0.85 * 0.05
    recs += _peer_records([{"seed": 0, "population": "cold", "ndcg@10": 0.054}])
    out = verdicts("ml100k", summarise(recs))
    assert out[0].endswith("**met**")                                    # 0.050 >= 0.9 * 0.054


def test_each_data_set_gets_an_equal_share_of_what_is_left():
    from bench.q2_quality import share

    assert share(900.0, 3) == 300.0 and share(300.0, 1) == 300.0
    assert share(-5.0, 2) == 0.0          # a spent budget leaves nothing, never a negative wait


def test_a_partial_run_names_what_it_left_out():
    import pytest

    from bench.q2_quality import PARTS, selected

    datasets, curve, left_out = selected(["synthetic"], quick=False)
    assert list(datasets) == ["synthetic"] and not curve
    assert left_out == ["real_cross_domain", "ml100k", "dp-curve"]
    datasets, curve, left_out = selected(None, quick=False)
    assert list(datasets) + ["dp-curve"] == list(PARTS) and curve and left_out == []
    with pytest.raises(ValueError, match="unknown part"):
        selected(["movielens"], quick=False)


def test_the_bench_command_rejects_an_unknown_q2_part(capsys):
    import pytest

    from bench.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--only", "Q2", "--q2-data", "movielens", "--out", "/nonexistent/never.md"])
    assert exc.value.code == 2 and "invalid choice: 'movielens'" in capsys.readouterr().err


def test_a_missed_b_says_whether_the_gap_is_in_training_or_in_adaptation():
    def rec(method, seed, cold, before):
        return {**_rec(method, seed, cold, 0.1, 0.1), "before/cold/ndcg@10": before}

    pops = [_rec(b, s, 0.05, 0.05, 0.05) for b in ("popularity", "item-knn") for s in (0, 1)]
    behind = pops + [rec("fedavg", s, 0.13, 0.13) for s in (0, 1)]
    behind += [rec("fomaml", s, 0.10, 0.10) for s in (0, 1)]
    out = "\n".join(verdicts("synthetic", summarise(behind)))
    assert "(b) cold" in out and "**missed**" in out
    assert "behind already as trained" in out and "changes cold NDCG@10 by +0 %" in out
    adapt = pops + [rec("fedavg", s, 0.13, 0.13) for s in (0, 1)]
    adapt += [rec("reptile", s, 0.10, 0.15) for s in (0, 1)]
    out = "\n".join(verdicts("synthetic", summarise(adapt)))
    assert "only after fine-tuning" in out and "by -33 %" in out
    met = pops + [rec("fedavg", s, 0.10, 0.10) for s in (0, 1)]
    met += [rec("maml", s, 0.20 + 0.001 * s, 0.2) for s in (0, 1)]
    assert "where the gap is" not in "\n".join(verdicts("synthetic", summarise(met)))
