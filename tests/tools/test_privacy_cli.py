"""``fedmeta-privacy``: plan answers, verification, bad input, and the trade-off grid."""

import json
import math
import re
import struct

import pandas as pd
import pytest

from fedmeta.privacy import planning
from fedmeta.tools import privacy_cli as cli
from fedmeta.tools import privacy_grid as tradeoff
from fedmeta.privacy.accounting import (agrees, conservative_epsilon, history_epsilon,
                                        independent_epsilon)
from fedmeta.privacy.planning import central_epsilon, epsilon_for_noise, noise_for_budget

LOCAL = ["--delta", "1e-3", "--rounds", "5", "--local-steps", "2", "--sample-rate", "0.2"]


def table_value(text: str, name: str) -> str:
    m = re.search(rf"^\| {re.escape(name)} \| (.+?) \|$", text, re.M)
    assert m, f"no row {name!r} in\n{text}"
    return m.group(1)


# ---- plan -------------------------------------------------------------------------------
SPENT = "epsilon spent (larger of both accountants)"


def eps_at(text: str) -> tuple[float, float]:
    """(epsilon, delta) from a value printed as 'E at delta=D'."""
    m = re.fullmatch(r"([0-9.]+) at delta=([0-9.e+-]+)", text)
    assert m, f"an epsilon printed without its delta: {text!r}"
    return float(m.group(1)), float(m.group(2))


def test_plan_solves_noise_for_a_target_once_over_all_steps(capsys):
    # q = 1 keeps the solver fast; subsampled solving is covered by the planning tests
    args = ["--delta", "1e-3", "--rounds", "5", "--local-steps", "2", "--sample-rate", "1"]
    assert cli.main(["plan", "--target-epsilon", "2", *args]) == 0
    out = capsys.readouterr().out
    sigma = float(table_value(out, "noise multiplier (solved)"))
    spent, delta = eps_at(table_value(out, SPENT))
    assert delta == 1e-3
    assert table_value(out, "steps") == "5 rounds x 2 local steps = 10"
    assert sigma == pytest.approx(noise_for_budget(2.0, 1e-3, 1.0, 10), abs=1e-4)
    assert 2.0 - planning.EPSILON_TOLERANCE - 1e-4 <= spent <= 2.0
    assert spent == pytest.approx(epsilon_for_noise(sigma, 1e-3, 1.0, 10), abs=1e-4)
    assert epsilon_for_noise(sigma, 1e-3, 1.0, 5) < spent - 0.5     # all 10 steps counted
    assert "dp_accounting" not in out


def test_readme_plan_verifies_and_states_the_larger_epsilon(capsys):
    """The README's command: it used to exit 1 (Opacus 7.9994 vs dp_accounting 8.1508)."""
    args = ["plan", "--target-epsilon", "8", "--delta", "1e-3", "--rounds", "10",
            "--local-steps", "10", "--sample-rate", "0.25", "--verify"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    sigma = float(table_value(out, "noise multiplier (solved)"))
    spent, delta = eps_at(table_value(out, SPENT))
    ours, _ = eps_at(table_value(out, "epsilon (opacus)"))
    theirs, _ = eps_at(table_value(out, "epsilon (dp_accounting)"))
    assert delta == 1e-3 and table_value(out, "accountants agree") == "yes"
    assert spent == max(ours, theirs) <= 8.0
    # recomputed here from the printed sigma by both libraries, no tolerance
    assert independent_epsilon([(sigma, 0.25, 100)], 1e-3) <= 8.0
    assert history_epsilon([(sigma, 0.25, 100)], 1e-3) <= 8.0
    assert theirs > ours               # a fractional order is optimal here: the looser bound


def test_plan_epsilon_for_noise_with_verify(capsys):
    assert cli.main(["plan", "--noise-multiplier", "1.5", *LOCAL, "--verify"]) == 0
    out = capsys.readouterr().out
    spent, _ = eps_at(table_value(out, SPENT))
    ours, _ = eps_at(table_value(out, "epsilon (opacus)"))
    theirs, _ = eps_at(table_value(out, "epsilon (dp_accounting)"))
    assert ours == pytest.approx(history_epsilon([(1.5, 0.2, 10)], 1e-3), abs=1e-4)
    assert theirs == pytest.approx(independent_epsilon([(1.5, 0.2, 10)], 1e-3), abs=1e-4)
    assert spent == max(ours, theirs)
    assert table_value(out, "accountants agree") == "yes"
    assert "integer orders" in table_value(out, "like-with-like check")


def test_every_printed_epsilon_carries_its_delta(capsys):
    assert cli.main(["plan", "--noise-multiplier", "1.5", *LOCAL, "--verify"]) == 0
    rows = re.findall(r"^\| (.*epsilon.*?) \| (.+?) \|$", capsys.readouterr().out, re.M)
    values = [v for k, v in rows if re.match(r"^[0-9.]+", v)]
    assert len(values) == 3
    for v in values:
        assert eps_at(v)[1] == 1e-3


def test_plan_central_counts_one_step_per_round(capsys):
    args = ["plan", "--central", "--noise-multiplier", "1.0", "--delta", "1e-5",
            "--rounds", "20", "--sample-rate", "0.5", "--verify"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert table_value(out, "steps") == "20 rounds"
    assert eps_at(table_value(out, SPENT))[0] == pytest.approx(
        central_epsilon(1.0, 0.5, 20, 1e-5), abs=1e-4)


def test_plan_default_delta_is_one_tenth_over_the_users(capsys):
    args = ["plan", "--noise-multiplier", "1.5", "--users", "400", "--rounds", "5",
            "--local-steps", "2", "--sample-rate", "0.2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert float(table_value(out, "delta")) == 1 / 4000
    assert "1/(10 x 400 users)" in table_value(out, "delta policy")
    spent, delta = eps_at(table_value(out, SPENT))
    assert delta == 1 / 4000
    assert spent == pytest.approx(epsilon_for_noise(1.5, 1 / 4000, 0.2, 10), abs=1e-4)


def test_plan_refuses_a_delta_above_the_policy_and_a_missing_delta(capsys):
    base = ["plan", "--noise-multiplier", "1.5", "--rounds", "5", "--local-steps", "2",
            "--sample-rate", "0.2"]
    assert cli.main([*base, "--users", "400", "--delta", "1e-3"]) == 2
    assert "argument --delta" in capsys.readouterr().err
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "argument --delta" in err and "--users" in err
    assert cli.main([*base, "--users", "400", "--delta", "1e-5"]) == 0


def test_verify_fails_when_the_accountants_disagree(monkeypatch, capsys):
    real = planning.rdp_curves

    def wrong(history):
        orders, ours, theirs = real(history)
        return orders, ours, theirs * 1.5      # disagrees at the integer orders

    monkeypatch.setattr(planning, "rdp_curves", wrong)
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
    """A run directory as a simulation leaves it: each node's ledger on its own disk."""
    node = run_dir / "nodes" / "a-0"
    node.mkdir(parents=True)
    acc = {"format": 1, "mechanism": "rdp", "delta": delta, "target_epsilon": target,
           "history": history}
    (node / "privacy_ledger.json").write_text(json.dumps(
        {"client_id": "a-0", "accountant": acc, "plan": {"delta": delta}}))
    return {"client_epsilon": {"a-0": reported}, "final_metrics": {}}


def test_local_check_recomputes_from_history(tmp_path):
    history = [[1.2, 0.25, 12]]
    eps = conservative_epsilon(history, 0.01)        # what a node reports: the larger figure
    rep = tradeoff.check_local(fake_local_run(tmp_path, eps, history), tmp_path, 4.0)
    assert rep.status == "ok" and rep.epsilon == pytest.approx(eps)
    assert rep.independent == pytest.approx(independent_epsilon(history, 0.01))
    assert rep.delta == 0.01


def test_local_check_never_reports_less_than_the_history(tmp_path):
    history = [[1.2, 0.25, 12]]
    eps = conservative_epsilon(history, 0.01)
    rep = tradeoff.check_local(fake_local_run(tmp_path, eps / 2, history), tmp_path, 4.0)
    assert rep.status == "MISMATCH" and "history gives" in rep.notes[0]
    assert rep.epsilon == pytest.approx(eps)


def test_local_check_flags_a_spend_over_the_target(tmp_path):
    history = [[0.8, 0.5, 40]]
    eps = history_epsilon(history, 0.01)
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
    eps = conservative_epsilon(history, 0.01)

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


@pytest.mark.slow
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
    by = frame.set_index("setting")
    # a DP node keeps its training (warm) users' metrics to itself: they are not noised
    warm = [c for c in metric_cols if "/warm/" in c]
    shared = [c for c in metric_cols if c not in warm]
    assert by.loc["local-eps-8", warm].isna().all()
    assert by.loc["no-dp", metric_cols].between(0, 1).all()
    assert by.loc["local-eps-8", shared].between(0, 1).all()
    assert (frame["wall_time_s"] > 0).all()

    nodp = frame.set_index("setting").loc["no-dp"]
    assert nodp[["local_epsilon", "local_epsilon_target", "central_epsilon", "delta"]].isna().all()
    dp = frame.set_index("setting").loc["local-eps-8"]
    assert dp["local_epsilon_target"] == 8 and 0 < dp["local_epsilon"] <= 8
    assert dp["epsilon_check"] == "ok" and pd.isna(dp["central_epsilon"])
    assert agrees(dp["local_epsilon"], dp["local_epsilon_independent"])
    # the independent value is the worst client's, straight from the stored histories
    ledgers = [json.loads(p.read_text())
               for p in (out / "local-eps-8" / "nodes").glob("*/privacy_ledger.json")]
    assert ledgers
    theirs = [independent_epsilon(x["accountant"]["history"], x["plan"]["delta"])
              for x in ledgers]
    assert dp["local_epsilon_independent"] == pytest.approx(max(theirs))
    assert dp["delta"] == max(x["plan"]["delta"] for x in ledgers)

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
    assert "| accountants agree | yes |" in captured.out
    assert "failed to converge" not in captured.out + captured.err
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


def test_run_directories_reach_hydra_intact():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_override
    for path in ("/tmp/plain-1.5/x", "/tmp/with space/x", "/tmp/it's=odd/x"):
        assert parse(f"hydra.run.dir={tradeoff.hydra_value(path)}").value() == path


# ---- audit ------------------------------------------------------------------------------
SMALL_AUDIT = ["--canaries", "200", "--fillers", "50", "--dim", "300", "--rounds", "5",
               "--local-steps", "4", "--sample-rate", "1"]    # q = 1: the solve is instant


def test_audit_prints_the_table_and_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "audit"
    assert cli.main(["audit", "--epsilons", "4", "inf", "--out", str(out), *SMALL_AUDIT]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "audit.json").read_text())
    assert data["setup"]["canaries"] == 200 and data["setup"]["sample_rate"] == 1.0
    assert "fedmeta-privacy audit --epsilons 4 inf" in data["command"]
    finite, off = data["results"]
    assert finite["target_epsilon"] == 4.0 and off["target_epsilon"] == "inf"
    assert off["epsilon"] == "inf" and off["noise_multiplier"] == 0.0
    sigma = finite["noise_multiplier"]
    assert finite["epsilon"] == history_epsilon([(sigma, 1.0, 20)], 1e-5) <= 4.0
    assert finite["epsilon_dp_accounting"] == pytest.approx(
        independent_epsilon([(sigma, 1.0, 20)], 1e-5), rel=1e-12)
    assert 0 <= finite["lower_bound"] <= finite["epsilon"]
    assert off["lower_bound"] > finite["lower_bound"]
    for r in (finite, off):
        assert r["delta"] == 1e-5 and r["confidence"] == 0.95 and r["canaries"] == 200
        assert r["correct"] <= r["guesses"]
        assert max(c["lower_bound"] for c in r["per_count"]) == r["lower_bound"]
    md = (out / "audit.md").read_text()
    header = "| ε (accountant) | ε (dp_accounting) | δ | σ | empirical ε lower bound |"
    assert header in md and header in printed
    row = f"| ∞ | ∞ | 1e-05 | 0.0000 | {off['lower_bound']:.2f} | 95% | 200 | " \
          f"{off['correct']} / {off['guesses']} |"
    assert row in md and row in printed


def test_audit_exits_1_when_the_bound_exceeds_the_accountant(tmp_path, capsys, monkeypatch):
    from fedmeta.tools import privacy_audit as audit_mod

    real = audit_mod.build_private_step
    monkeypatch.setattr(audit_mod, "build_private_step",      # 1/20 of the noise it claims
                        lambda clip, n, q, sigma, gen: real(clip, n, q, sigma / 20, gen))
    code = cli.main(["audit", "--epsilons", "1", "--out", str(tmp_path), *SMALL_AUDIT])
    captured = capsys.readouterr()
    assert code == 1 and "EXCEEDS" in captured.err
    result = json.loads((tmp_path / "audit.json").read_text())["results"][0]
    assert result["lower_bound"] > result["epsilon"]


@pytest.mark.parametrize("args,flag", [
    (["--fillers", "-1"], "--fillers"),
    (["--dim", "10"], "--dim"),                   # dirac canaries need one coordinate each
    (["--epsilons", "0"], "--epsilons"),
    (["--confidence", "1"], "--confidence"),
    (["--canary", "star"], "--canary"),
])
def test_bad_audit_input_exits_2_naming_the_flag(args, flag, tmp_path, capsys):
    try:
        code = cli.main(["audit", "--out", str(tmp_path), "--canaries", "20", *args])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "audit.json").exists()
