"""P5's parts that need no peer installed: the workload spec, result parsing, verdicts and the
venv's idempotence check. Nothing here installs or starts a simulator."""

from __future__ import annotations

import json

import pytest

from bench import p5_peer
from bench.peer import install
from bench.peer.workload import WorkloadError, check_mirrorable, compose, config_differences


def test_overrides_are_the_same_workload_for_both_privacy_modes():
    off, on = p5_peer.overrides(False, "none"), p5_peer.overrides(False, "central")
    assert "privacy=none" in off and "privacy=central" in on
    strip = lambda o: [x for x in o if not x.startswith("privacy")]  # noqa: E731
    assert strip(off) == strip(on)
    assert "algorithm=fedavg" in off and "runtime.fraction_train=1.0" in off
    assert not any(x.startswith("runtime=") for x in off)   # the runtime is chosen per run


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("privacy", ["none", "central"])
def test_workload_composes_and_is_mirrorable(quick, privacy):
    cfg = compose(["runtime=inprocess", *p5_peer.overrides(quick, privacy)])
    check_mirrorable(cfg)
    assert cfg.algorithm.name == "fedavg"
    assert cfg.privacy.central.enabled is (privacy == "central")
    if privacy == "central":
        c = cfg.privacy.central
        assert (c.side, c.clipping, c.noise_multiplier, c.clipping_norm) == ("server", "fixed",
                                                                            0.5, 1.0)
    if not quick:   # fedmeta's default synthetic sizes
        assert cfg.data.synthetic["ecommerce_users"] == 800
        assert cfg.data.synthetic["social_users"] == 800


def test_unmirrorable_config_is_refused_with_the_key():
    cfg = compose(["runtime=inprocess", "algorithm=maml", "privacy=local"])
    with pytest.raises(WorkloadError, match="algorithm.name.*privacy.local"):
        check_mirrorable(cfg)


def test_round_stats_leave_the_eval_round_out_of_the_median():
    got = p5_peer.round_stats([{"seconds": s} for s in (3.0, 1.0, 2.0, 10.0)])
    assert got == {"round_s": 2.0, "last_s": 10.0, "n": 4, "total_s": 16.0}
    assert p5_peer.round_stats([{"seconds": 4.0}])["round_s"] == 4.0
    with pytest.raises(ValueError):
        p5_peer.round_stats([])


def test_parse_peer_takes_the_last_result_line():
    good = {"rounds": [{"round": 1, "seconds": 1.5}], "setup_s": 1, "wall_s": 2,
            "final_metrics": {}, "config": {}}
    out = p5_peer.parse_peer("pfl log\n{\"partial\": 1}\n" + json.dumps(good) + "\n")
    assert out["rounds"][0]["seconds"] == 1.5
    with pytest.raises(ValueError, match="no result"):
        p5_peer.parse_peer("only logs\n")
    with pytest.raises(ValueError, match="final_metrics"):
        p5_peer.parse_peer(json.dumps({"rounds": [], "setup_s": 0, "wall_s": 0, "config": {}}))


def test_node_sizes_and_match():
    log = ("[x][fedmeta.runtime.node][INFO] - node ecommerce-0: 119 training users, 31 cold "
           "users, 600 catalogue items, device cpu, local DP off\n"
           "node social-4: 0 training users, 155 cold users, 600 catalogue items, device cpu")
    sizes = p5_peer.node_sizes(log)
    assert sizes == {"ecommerce-0": {"train_users": 119, "cold_users": 31, "items": 600},
                     "social-4": {"train_users": 0, "cold_users": 155, "items": 600}}
    peer = {cid: {**v, "warm_eval": 3} for cid, v in sizes.items()}
    assert p5_peer.sizes_match(peer, sizes) is True
    peer["social-4"]["items"] = 599
    assert p5_peer.sizes_match(peer, sizes) is False
    assert p5_peer.sizes_match(peer, {}) is None


def test_central_dp_is_read_from_the_summary():
    assert p5_peer.has_central_dp({"central_dp": {"epsilon": 3.0}, "rounds": []})
    assert p5_peer.has_central_dp({"rounds": [{"central_dp": {"released": True}}]})
    assert not p5_peer.has_central_dp({"rounds": [{"seconds": 1.0}]})


def _run(rounds, dp=False, **extra):
    return {"rounds": [{"seconds": s} for s in rounds], "wall_s": sum(rounds) + 5,
            "final_metrics": {"d": {"warm": {"after": {"ndcg@10": 0.1}}}}, "central_dp": dp,
            "config": {"seed": 0}, "sizes": {}, **extra}


def test_summary_ratios_verdicts_and_a_runtime_without_central_dp():
    found = {"setup": {"installed": False, "commands": ["python -m venv x"]}, "runs": {
        "none": {"pfl-1": [_run([2.0, 2.0, 5.0])], "pfl-2": [_run([1.6, 1.6, 4.0])],
                 "inprocess": [_run([1.0, 1.0, 3.0], cmd="fedmeta-simulate runtime=inprocess")],
                 "simulation": [_run([3.2, 3.2, 4.0], cmd="fedmeta-simulate runtime=simulation")]},
        "central": {"pfl-1": [_run([2.0, 5.0], dp=True)], "pfl-2": [{"error": "exit 1: boom"}],
                    "inprocess": [_run([1.0, 3.0], dp=False)],
                    "simulation": [_run([2.0, 3.0], dp=True)]}}}
    s = p5_peer.summarise(found)
    assert s["none"]["ip_ratio"] == pytest.approx(0.5)
    assert s["none"]["sim_ratio"] == pytest.approx(2.0)          # against the faster peer run
    assert s["central"]["ip_ratio"] is None                      # in-process ran without DP
    assert s["central"]["sim_ratio"] == pytest.approx(1.0)
    notes = " ".join(s["central"]["notes"])
    assert "without* central DP" in notes and "boom" in notes
    text = p5_peer.render(found, s)
    assert "in-process at least as fast as pfl: **met** (x0.50" in text
    assert "within 1.5x of pfl: **missed** (x2.00" in text
    assert "**not measured**" in text


def test_venv_ready_only_with_a_matching_marker(tmp_path):
    steps = [["torch==1.0"], ["pfl[pytorch]==0.6.0"]]
    assert not install.ready(tmp_path, steps)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    (tmp_path / install.MARKER).write_text(json.dumps(steps))
    assert install.ready(tmp_path, steps)
    assert not install.ready(tmp_path, [["torch==2.0"], steps[1]])


def test_requirements_pin_torch_first_to_fedmeta_s_build():
    first, rest = install.requirements()
    assert len(first) == 1 and first[0].startswith("torch==")
    assert install.PEER in rest and any(r.startswith("transformers==") for r in rest)


def test_config_differences_name_the_dotted_keys():
    peer = {"seed": 0, "privacy": {"local": {"enabled": False}},
            "runtime": {"rounds": 3, "fraction_train": 1.0, "eval_every": 0}}
    same = {"seed": 0, "privacy": {"local": {"enabled": False}},
            "runtime": {"rounds": 3, "fraction_train": 1.0, "eval_every": 0, "plots": False}}
    assert config_differences(peer, same) == []
    other = {"seed": 0, "privacy": {"local": {"enabled": False, "population": None}},
             "runtime": {"rounds": 3, "fraction_train": 1.0, "eval_every": 2}}
    assert config_differences(peer, other) == ["privacy.local.population", "runtime.eval_every"]


def test_an_eval_schedule_the_peer_does_not_follow_is_refused():
    cfg = compose(["runtime=inprocess", *p5_peer.overrides(True, "none"), "runtime.eval_every=2"])
    with pytest.raises(WorkloadError, match="eval_every"):
        check_mirrorable(cfg)


def test_the_profile_names_the_functions_with_most_own_time(tmp_path):
    import cProfile

    def busy():
        return sum(i * i for i in range(200_000))

    prof = tmp_path / "x.prof"
    cProfile.runctx("busy()", {"busy": busy}, {}, str(prof))
    got = p5_peer.top_functions(prof, n=3)
    assert len(got["top"]) == 3 and got["total_s"] > 0
    assert got["top"][0][1] >= got["top"][1][1] >= got["top"][2][1]      # sorted by own time
    assert any("genexpr" in f or "busy" in f for f, _ in got["top"])
    text = "\n".join(p5_peer.profile_text({"inprocess": got,
                                           "pfl-1": {"error": "exit 1: boom"}}))
    assert "fedmeta in-process" in text and "profile failed: exit 1: boom" in text
