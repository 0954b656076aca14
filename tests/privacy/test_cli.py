"""``fedmeta-privacy``: plan answers, verification, bad input, and the trade-off grid."""

import json
import math
import re
import struct

import pandas as pd
import pytest

from fedmeta.privacy import cli, planning, tradeoff
from fedmeta.privacy.accounting import agrees, independent_epsilon
from fedmeta.privacy.planning import central_epsilon, epsilon_for_noise, noise_for_budget

LOCAL = ["--delta", "1e-3", "--rounds", "5", "--local-steps", "2", "--sample-rate", "0.2"]


def table_value(text: str, name: str) -> str:
    m = re.search(rf"^\| {re.escape(name)} \| (.+?) \|$", text, re.M)
    assert m, f"no row {name!r} in\n{text}"
    return m.group(1)


# ---- plan -------------------------------------------------------------------------------
def test_plan_solves_noise_for_a_target_once_over_all_steps(capsys):
    # q = 1 keeps the solver fast; subsampled solving is covered by the planning tests
    args = ["--delta", "1e-3", "--rounds", "5", "--local-steps", "2", "--sample-rate", "1"]
    assert cli.main(["plan", "--target-epsilon", "2", *args]) == 0
    out = capsys.readouterr().out
    sigma = float(table_value(out, "noise multiplier (solved)"))
    spent = float(table_value(out, "epsilon spent"))
    assert table_value(out, "steps") == "5 rounds x 2 local steps = 10"
    assert sigma == pytest.approx(noise_for_budget(2.0, 1e-3, 1.0, 10), abs=1e-4)
    assert 2.0 - planning.EPSILON_TOLERANCE - 1e-4 <= spent <= 2.0
    assert spent == pytest.approx(epsilon_for_noise(sigma, 1e-3, 1.0, 10), abs=1e-4)
    assert epsilon_for_noise(sigma, 1e-3, 1.0, 5) < spent - 0.5     # all 10 steps counted
    assert "dp_accounting" not in out


def test_plan_epsilon_for_noise_with_verify(capsys):
    assert cli.main(["plan", "--noise-multiplier", "1.5", *LOCAL, "--verify"]) == 0
    out = capsys.readouterr().out
    ours = float(table_value(out, "epsilon spent"))
    theirs = float(table_value(out, "epsilon (dp_accounting)"))
    assert ours == pytest.approx(epsilon_for_noise(1.5, 1e-3, 0.2, 10), abs=1e-4)
    assert theirs == pytest.approx(independent_epsilon([(1.5, 0.2, 10)], 1e-3), abs=1e-4)
    assert agrees(ours, theirs) and table_value(out, "accountants agree") == "yes"


def test_plan_central_counts_one_step_per_round(capsys):
    args = ["plan", "--central", "--noise-multiplier", "1.0", "--delta", "1e-5",
            "--rounds", "20", "--sample-rate", "0.5", "--verify"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert table_value(out, "steps") == "20 rounds"
    assert float(table_value(out, "epsilon spent")) == pytest.approx(
        central_epsilon(1.0, 0.5, 20, 1e-5), abs=1e-4)


def test_verify_fails_when_the_accountants_disagree(monkeypatch, capsys):
    real = planning.independent_epsilon
    monkeypatch.setattr(planning, "independent_epsilon", lambda *a, **k: 1.5 * real(*a, **k))
    assert cli.main(["plan", "--noise-multiplier", "1.5", *LOCAL, "--verify"]) == 1
    captured = capsys.readouterr()
    assert table_value(captured.out, "accountants agree") == "NO"
    assert "disagree" in captured.err


@pytest.mark.parametrize("args,flag", [
    (["--target-epsilon", "2", "--delta", "2", "--rounds", "5", "--local-steps", "2",
      "--sample-rate", "0.2"], "--delta"),
    (["--target-epsilon", "-1", *LOCAL], "--target-epsilon"),
    (["--target-epsilon", "abc", *LOCAL], "--target-epsilon"),
    (["--noise-multiplier", "1", "--delta", "1e-3", "--rounds", "0", "--local-steps", "2",
      "--sample-rate", "0.2"], "--rounds"),
    (["--noise-multiplier", "1", "--delta", "1e-3", "--rounds", "5", "--local-steps", "2",
      "--sample-rate", "1.5"], "--sample-rate"),
    (["--noise-multiplier", "1", "--delta", "1e-3", "--rounds", "5", "--sample-rate", "0.2"],
     "--local-steps"),
    (["--central", "--noise-multiplier", "1", *LOCAL], "--local-steps"),
    (["--target-epsilon", "1", "--noise-multiplier", "1", *LOCAL], "--noise-multiplier"),
    (["--target-epsilon", "1e-4", "--delta", "1e-5", "--rounds", "1000", "--local-steps",
      "100", "--sample-rate", "1"], "--target-epsilon"),       # unreachable budget
    (["--noise-multiplier", "1", *LOCAL, "--mechanism", "gdp"], "--mechanism"),
])
def test_bad_plan_input_exits_2_naming_the_flag(args, flag, capsys):
    try:
        code = cli.main(["plan", *args])
    except SystemExit as stop:          # argparse's own errors
        code = stop.code
    assert code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--local-eps", "0"], "argument --local-eps"),
    (["--central-noise", "-1"], "argument --central-noise"),
    (["--local-eps", "--central-noise"], "--local-eps/--central-noise"),
    (["--local-eps", "8", "--central-noise", "privacy=local"], "privacy:"),
    (["--local-eps", "8", "--central-noise", "runtime.rounds=0"], "runtime.rounds"),
])
def test_bad_grid_input_exits_2_before_training(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tradeoff, "run_setting", lambda *a: pytest.fail("must not train"))
    try:
        code = cli.main(["grid", "--out", str(tmp_path), *args])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_hydra_overrides_are_not_eaten_by_list_flags():
    rest, overrides = cli.split_overrides(
        ["grid", "--local-eps", "8", "inf", "data=synthetic_small", "--out", "a=b",
         "+x.y=1", "--central-noise", "1"])
    assert overrides == ["data=synthetic_small", "+x.y=1"]
    args = cli.parser().parse_args(rest)
    assert args.local_eps == [8.0, math.inf] and args.central_noise == [1.0]
    assert str(args.out) == "a=b"


# ---- epsilon checks (hand-made run directories, no training) ----------------------------
def fake_local_run(run_dir, reported, history, delta=0.01, target=4.0):
    (run_dir / "checkpoint").mkdir(parents=True)
    acc = {"format": 1, "mechanism": "rdp", "delta": delta, "target_epsilon": target,
           "history": history}
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps(
        {"client_states": {"a-0": {"dp": {"accountant": acc}, "delta": delta}}}))
    return {"client_epsilon": {"a-0": reported}, "final_metrics": {}}


def test_local_check_recomputes_from_history(tmp_path):
    history = [[1.2, 0.25, 12]]
    eps = epsilon_for_noise(1.2, 0.01, 0.25, 12)
    rep = tradeoff.check_local(fake_local_run(tmp_path, eps, history), tmp_path, 4.0)
    assert rep.status == "ok" and rep.epsilon == pytest.approx(eps)
    assert rep.independent == pytest.approx(independent_epsilon(history, 0.01))
    assert rep.delta == 0.01


def test_local_check_never_reports_less_than_the_history(tmp_path):
    history = [[1.2, 0.25, 12]]
    eps = epsilon_for_noise(1.2, 0.01, 0.25, 12)
    rep = tradeoff.check_local(fake_local_run(tmp_path, eps / 2, history), tmp_path, 4.0)
    assert rep.status == "MISMATCH" and "history gives" in rep.notes[0]
    assert rep.epsilon == pytest.approx(eps)


def test_local_check_flags_a_spend_over_the_target(tmp_path):
    history = [[0.8, 0.5, 40]]
    eps = epsilon_for_noise(0.8, 0.01, 0.5, 40)
    assert eps > 4
    rep = tradeoff.check_local(fake_local_run(tmp_path, eps, history), tmp_path, 4.0)
    assert rep.status == "MISMATCH" and "exceeds the target" in rep.notes[0]


def test_local_check_without_history_is_unverified(tmp_path):
    rep = tradeoff.check_local({"client_epsilon": {"a-0": 3.0}}, tmp_path, 4.0)
    assert rep.status == "unverified" and rep.epsilon == 3.0 and math.isnan(rep.independent)


def central_summary(rounds=None, **extra):
    return {"config": {"privacy": {"central": {"noise_multiplier": 1.0, "delta": 1e-5}},
                       "runtime": {"fraction_train": 0.5, "rounds": 6}},
            "rounds": rounds or [{}] * 6, "client_epsilon": {}, "final_metrics": {}, **extra}


def test_central_check_computes_when_the_runner_reports_nothing():
    rep = tradeoff.check_central(central_summary())
    assert rep.status == "ok (computed)"
    # clients are drawn from the public seed: no amplification from fraction_train=0.5
    assert rep.epsilon == pytest.approx(central_epsilon(1.0, 1.0, 6, 1e-5))
    assert rep.epsilon > central_epsilon(1.0, 0.5, 6, 1e-5)
    bad = tradeoff.check_central(central_summary(central_epsilon=0.1))
    assert bad.status == "MISMATCH" and bad.epsilon == pytest.approx(rep.epsilon)


def test_central_check_counts_released_rounds_and_reads_the_runner_value():
    rounds = [{"central_dp": {"released": r != 2}} for r in range(1, 6)]    # round 2 withheld
    eps = central_epsilon(1.0, 1.0, 4, 1e-5)
    rep = tradeoff.check_central(central_summary(rounds, central_dp={"epsilon": eps}))
    assert rep.status == "ok" and rep.epsilon == pytest.approx(eps)
    assert rep.independent == pytest.approx(independent_epsilon([(1.0, 1.0, 4)], 1e-5))


def test_grid_fails_loudly_on_a_bad_epsilon(tmp_path, monkeypatch, capsys):
    history = [[1.2, 0.25, 12]]
    eps = epsilon_for_noise(1.2, 0.01, 0.25, 12)

    def runner(overrides, out_dir, threads=None):
        if "privacy=central" in overrides:
            return central_summary()
        return fake_local_run(out_dir, eps / 2, history)      # under-reports its epsilon

    monkeypatch.setattr(tradeoff, "run_setting", runner)
    code = cli.main(["grid", "--local-eps", "4", "--central-noise", "1", "--out",
                     str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1 and "FAILED for local-eps-4" in captured.err
    frame = pd.read_csv(tmp_path / "privacy_tradeoff.csv")
    assert frame.loc[0, "local_epsilon"] == pytest.approx(eps)
    assert frame.loc[1, "epsilon_check"] == "ok (computed)"
    assert "computed here" in captured.out


# ---- the grid, for real -----------------------------------------------------------------
TINY = ["data=synthetic_small", "runtime.rounds=1", "algorithm.local_steps=1",
        "data.max_eval_users=4", "algorithm.inner_steps=1", "algorithm.negatives=8",
        "algorithm.users_per_step=64", "data.synthetic.ecommerce_users=60",
        "data.synthetic.social_users=60", "data.synthetic.ecommerce_items=50",
        "data.synthetic.social_items=50", "data.max_len=10"]


def test_grid_on_a_tiny_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the runs are subprocesses; keep them lean
    out = tmp_path / "grid"
    assert cli.main(["grid", "--local-eps", "8", "inf", "--central-noise", "--out", str(out),
                     *TINY]) == 0
    printed = capsys.readouterr().out
    frame = pd.read_csv(out / "privacy_tradeoff.csv")
    assert list(frame["setting"]) == ["local-eps-8", "no-dp"]
    metric_cols = [f"{d}/{p}/{m}" for d in ("ecommerce", "social")
                   for p in ("warm", "cold", "new-client") for m in ("hr@10", "ndcg@10")]
    assert set(metric_cols) <= set(frame.columns)
    assert frame[metric_cols].apply(lambda c: c.between(0, 1)).all().all()
    assert (frame["wall_time_s"] > 0).all()

    nodp = frame.set_index("setting").loc["no-dp"]
    assert nodp[["local_epsilon", "local_epsilon_target", "central_epsilon", "delta"]].isna().all()
    dp = frame.set_index("setting").loc["local-eps-8"]
    assert dp["local_epsilon_target"] == 8 and 0 < dp["local_epsilon"] <= 8
    assert dp["epsilon_check"] == "ok" and pd.isna(dp["central_epsilon"])
    assert agrees(dp["local_epsilon"], dp["local_epsilon_independent"])
    # the independent value is the worst client's, straight from the stored histories
    states = json.loads((out / "local-eps-8" / "checkpoint" / "state.json").read_text())
    theirs = [independent_epsilon(s["dp"]["accountant"]["history"], s["delta"])
              for s in states["client_states"].values()]
    assert dp["local_epsilon_independent"] == pytest.approx(max(theirs))
    assert dp["delta"] == max(s["delta"] for s in states["client_states"].values())

    png = (out / "privacy_tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 200
    assert "| local-eps-8 | 8.00 |" in printed and "| no-dp |" in printed


def test_plan_output_has_no_dp_accounting_convergence_noise(capfd, caplog):
    # at q=0.5 and sigma~7.3 dp_accounting drops several fractional orders, one warning each
    assert cli.main(["plan", "--noise-multiplier", "7.32421875", "--delta", "0.0078125",
                     "--rounds", "40", "--local-steps", "1", "--sample-rate", "0.5",
                     "--verify"]) == 0
    captured = capfd.readouterr()
    assert "accountants agree | yes" in captured.out
    assert "failed to converge" not in captured.out + captured.err
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


def test_run_directories_reach_hydra_intact():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_override
    for path in ("/tmp/plain-1.5/x", "/tmp/with space/x", "/tmp/it's=odd/x"):
        assert parse(f"hydra.run.dir={tradeoff.hydra_value(path)}").value() == path
