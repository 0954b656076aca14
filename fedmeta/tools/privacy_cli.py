"""``fedmeta-privacy``: plan a privacy budget, audit the mechanism, or measure the trade-off.

``plan`` answers without training: the noise multiplier that spends a target epsilon over a
whole run (solved once for all rounds x local steps), or the epsilon a noise multiplier
spends. Every epsilon is computed by Opacus and by Google's dp_accounting and the larger is
stated, with its delta. ``--central`` plans client-level central DP instead (one Gaussian
aggregation per round at the client sampling rate). ``--verify`` also shows both values and
fails when the two accountants disagree where they compute the same quantity. Without
``--delta``, ``--users N`` is required and delta = 1/(10 N).

``audit`` plants canary users in a client's privatised run and reports the empirical epsilon
lower bound (one-run audit) beside the accountant's epsilon.

``grid`` trains the same data and seed under local DP at several target epsilons and
central DP at several noise multipliers, and tabulates utility against the verified epsilon.

Usage::

    fedmeta-privacy plan --target-epsilon 4 --delta 1e-3 --rounds 10 --local-steps 4 \\
        --sample-rate 0.1 --verify
    fedmeta-privacy plan --central --noise-multiplier 1.0 --users 200 --rounds 50 \\
        --sample-rate 0.5
    fedmeta-privacy audit --epsilons 1 4 8 inf --out outputs/audit
    fedmeta-privacy grid --local-eps 1 8 inf --central-noise 1.0 --out outputs/privacy \\
        runtime.rounds=5

Exit status: 0 ok, 1 an epsilon failed its independent check, an audit's lower bound exceeds
the accountant's epsilon, or a run failed; 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from fedmeta.config import ConfigError
from fedmeta.data.schema import DataError
from fedmeta.privacy.accounting import MECHANISMS
from fedmeta.tools.privacy_audit import CANARY_KINDS, FILLER_KINDS, AuditSetup, audit
from fedmeta.tools.privacy_audit import table_markdown as audit_table
from fedmeta.tools.privacy_audit import violations, write_report
from fedmeta.privacy.planning import PlanQuery, check_delta_policy, default_delta, plan
from fedmeta.tools.privacy_grid import (DEFAULT_CENTRAL_NOISE, DEFAULT_LOCAL_EPS,
                                      DEFAULT_OVERRIDES, EpsilonCheckError, failed_checks,
                                      footnotes, run_grid, table_markdown)

PROG = "fedmeta-privacy"


# ---- argument types: argparse names the flag in its error message ----------------------
def positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def positive_or_inf(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return positive(text)


def open_unit(text: str) -> float:
    v = positive(text)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return v


def rate(text: str) -> float:
    v = positive(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return v


def count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="noise for a target epsilon, or epsilon for a noise")
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument("--target-epsilon", type=positive, help="solve the noise for this budget")
    what.add_argument("--noise-multiplier", type=positive, help="epsilon spent at this noise")
    pl.add_argument("--delta", type=open_unit,
                    help="delta of the guarantee (default: 1/(10 N) with --users N)")
    pl.add_argument("--users", type=count,
                    help="N: users of the client (local) or clients of the federation "
                         "(central); required without --delta, and --delta may not exceed "
                         "1/(10 N)")
    pl.add_argument("--rounds", type=count, required=True)
    pl.add_argument("--local-steps", type=count,
                    help="DP-SGD steps per round inside a client (local DP only)")
    pl.add_argument("--sample-rate", type=rate, required=True,
                    help="users sampled per step / users of the client (local), or clients "
                         "per round / clients (central)")
    pl.add_argument("--mechanism", choices=MECHANISMS, default="rdp")
    pl.add_argument("--central", action="store_true",
                    help="client-level central DP: one noisy aggregation per round")
    pl.add_argument("--verify", action="store_true",
                    help="show both accountants' values and compare them like with like; "
                         "exit 1 if they disagree")

    au = sub.add_parser("audit", help="empirical epsilon lower bound from canary users",
                        description="One-run audit (Steinke, Nasr & Jagielski 2023) of the "
                                    "local DP step: canary users, each included with "
                                    "probability 1/2, in one client's privatised run.")
    au.add_argument("--epsilons", type=positive_or_inf, nargs="+", default=[1, 4, 8, math.inf],
                    metavar="EPS", help="target epsilons; inf = no noise (default: 1 4 8 inf)")
    au.add_argument("--out", type=Path, default=Path("outputs/privacy_audit"))
    au.add_argument("--canaries", type=count, default=AuditSetup.canaries)
    au.add_argument("--fillers", type=int, default=AuditSetup.fillers,
                    help="non-canary users of the client (default: %(default)s; with "
                         "--filler model, the synthetic client's own users)")
    au.add_argument("--dim", type=int, default=AuditSetup.dim,
                    help="dimension of the directions (0: canaries + 1000)")
    au.add_argument("--rounds", type=count, default=AuditSetup.rounds)
    au.add_argument("--local-steps", type=count, default=AuditSetup.local_steps)
    au.add_argument("--sample-rate", type=rate, default=AuditSetup.sample_rate)
    au.add_argument("--delta", type=open_unit, default=AuditSetup.delta)
    au.add_argument("--confidence", type=open_unit, default=AuditSetup.confidence)
    au.add_argument("--canary", choices=CANARY_KINDS, default=AuditSetup.canary)
    au.add_argument("--filler", choices=FILLER_KINDS, default=AuditSetup.filler,
                    help="random: a fresh random direction of norm C per step; none; model: "
                         "FedAvg gradients of the tiny fedmeta model (default: %(default)s)")
    au.add_argument("--mechanism", choices=MECHANISMS, default=AuditSetup.mechanism)
    au.add_argument("--seed", type=int, default=AuditSetup.seed)

    gr = sub.add_parser("grid", help="utility vs epsilon over local and central DP settings",
                        description="Hydra overrides (key=value) may appear anywhere; "
                                    f"defaults applied first: {' '.join(DEFAULT_OVERRIDES)}")
    gr.add_argument("--local-eps", type=positive_or_inf, nargs="*",
                    default=list(DEFAULT_LOCAL_EPS), metavar="EPS",
                    help="local DP target epsilons; inf = DP off (default: %(default)s)")
    gr.add_argument("--central-noise", type=positive, nargs="*",
                    default=list(DEFAULT_CENTRAL_NOISE), metavar="SIGMA",
                    help="central DP noise multipliers (default: %(default)s)")
    gr.add_argument("--out", type=Path, default=Path("outputs/privacy_tradeoff"))
    gr.add_argument("--seed", type=int, default=0)
    gr.add_argument("--jobs", type=count, default=min(2, os.cpu_count() or 1),
                    help="local-DP settings run side by side, one thread each "
                         "(default: %(default)s)")
    gr.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. runtime.rounds=5")
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull Hydra overrides out first: ``--local-eps 8 inf x=1`` must not eat ``x=1``."""
    takes_value = {"--out", "--seed", "--jobs"}
    rest, overrides, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in takes_value and i + 1 < len(argv):
            rest += [tok, argv[i + 1]]
            i += 2
            continue
        if not tok.startswith("-") and ("=" in tok or tok.startswith("~")):
            overrides.append(tok)
        else:
            rest.append(tok)
        i += 1
    return rest, overrides


# ---- plan -------------------------------------------------------------------------------
FLAG_OF = {"target_epsilon": "--target-epsilon", "noise_multiplier": "--noise-multiplier",
           "sample_rate": "--sample-rate", "delta": "--delta", "local_steps": "--local-steps",
           "rounds": "--rounds", "mechanism": "--mechanism", "users": "--users"}


def flag_for(message: str) -> str:
    for key, flag in FLAG_OF.items():
        if message.startswith(key) or f" {key}" in message:
            return flag
    return "input"


def at(eps: float, delta: float) -> str:
    """An epsilon is never printed without its delta."""
    return f"{eps:.4f} at delta={delta:.3g}"


def plan_table(q: PlanQuery, result: dict, central: bool, verify: bool,
               users: int | None = None) -> str:
    mode = ("central: client-level DP, one noisy aggregation per round" if central else
            "local: user-level DP-SGD inside each client")
    steps = (f"{q.rounds} rounds" if central else
             f"{q.rounds} rounds x {q.local_steps} local steps = {q.total_steps}")
    rows = [("mode", mode), ("mechanism", q.mechanism), ("delta", f"{q.delta:.3g}")]
    if users is not None:
        rows.append(("delta policy", f"<= 1/(10 x {users} {'clients' if central else 'users'})"
                                     f" = {default_delta(users):.3g}"))
    rows += [("sample rate", f"{q.sample_rate:.6g}"), ("steps", steps)]
    if q.target_epsilon is not None:
        key = "epsilon_at_noise_for_target"
        rows += [("target epsilon", f"{q.target_epsilon:g}"),
                 ("noise multiplier (solved)", f"{result['noise_for_target']:.4f}")]
    else:
        key = "epsilon_for_noise"
        rows += [("noise multiplier", f"{q.noise_multiplier:g}")]
    rows.append(("epsilon spent (larger of both accountants)", at(result[key], q.delta)))
    if verify:
        rows += [("epsilon (opacus)", at(result["opacus"][key], q.delta)),
                 ("epsilon (dp_accounting)", at(result["independent"][key], q.delta)),
                 ("like-with-like check", result["checks"][key]),
                 ("accountants agree", "yes" if result["agrees"] else "NO")]
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def plan_delta(args) -> float:
    """--delta as given (within the 1/(10 N) policy when --users is known), else 1/(10 N)."""
    if args.delta is None and args.users is None:
        raise ValueError("delta is required: give --delta, or --users N for the default "
                         "1/(10 N)")
    if args.delta is None:
        return default_delta(args.users)
    if args.users is not None:
        return check_delta_policy(args.delta, args.users)
    return args.delta


def plan_command(args, p: argparse.ArgumentParser) -> int:
    sub = f"{PROG} plan"
    if args.central and args.local_steps is not None:
        print(f"{sub}: error: argument --local-steps: not used with --central (central DP "
              "adds noise once per round)", file=sys.stderr)
        return 2
    if not args.central and args.local_steps is None:
        print(f"{sub}: error: argument --local-steps: required for local (user-level) "
              "planning", file=sys.stderr)
        return 2
    try:
        q = PlanQuery(args.target_epsilon, args.noise_multiplier, plan_delta(args),
                      args.rounds, 1 if args.central else args.local_steps, args.sample_rate,
                      args.mechanism)
        result = plan(q, verify=args.verify)
    except ValueError as err:
        print(f"{sub}: error: argument {flag_for(str(err))}: {err}", file=sys.stderr)
        return 2
    print(plan_table(q, result, args.central, args.verify, args.users))
    if args.verify and not result["agrees"]:
        print(f"{sub}: error: Opacus and dp_accounting disagree where they compute the same "
              "quantity; do not rely on this epsilon", file=sys.stderr)
        return 1
    return 0


# ---- audit ------------------------------------------------------------------------------
AUDIT_KEYS = ("canaries", "fillers", "dim", "confidence", "delta", "sample_rate", "rounds",
              "local_steps", "canary", "filler", "mechanism")


def audit_command(args, argv: list[str]) -> int:
    sub = f"{PROG} audit"
    try:
        setup = AuditSetup(canaries=args.canaries, fillers=args.fillers, dim=args.dim,
                           rounds=args.rounds, local_steps=args.local_steps,
                           sample_rate=args.sample_rate, delta=args.delta,
                           confidence=args.confidence, canary=args.canary, filler=args.filler,
                           mechanism=args.mechanism, seed=args.seed)
        results = []
        for eps in args.epsilons:
            results.append(audit(setup, eps))
            r = results[-1]
            print(f"epsilon {eps:g}: lower bound {r.lower_bound:.2f} (accountant "
                  f"{r.epsilon:.3f} at delta={r.delta:.3g}), {r.correct}/{r.guesses} correct, "
                  f"{r.seconds:.1f} s", file=sys.stderr)
    except ValueError as err:
        flag = next((f"--{k.replace('_', '-')}" for k in AUDIT_KEYS if str(err).startswith(k)),
                    flag_for(str(err)))
        print(f"{sub}: error: argument {flag}: {err}", file=sys.stderr)
        return 2
    command = " ".join([PROG, *argv])
    write_report(results, setup, args.out, command)
    print(audit_table(results))
    print(f"\n{args.out / 'audit.json'}, {args.out / 'audit.md'}")
    bad = violations(results)
    if bad:
        print(f"{sub}: error: the empirical lower bound EXCEEDS the accountant's epsilon for "
              f"target(s) {', '.join(f'{r.target_epsilon:g}' for r in bad)}: the mechanism "
              "leaks more than it claims", file=sys.stderr)
        return 1
    return 0


# ---- grid -------------------------------------------------------------------------------
def grid_command(args, overrides: list[str]) -> int:
    if not args.local_eps and not args.central_noise:
        print(f"{PROG} grid: error: argument --local-eps/--central-noise: no settings to run",
              file=sys.stderr)
        return 2
    try:
        frame = run_grid(args.local_eps, args.central_noise, overrides, args.out, args.seed,
                         jobs=args.jobs)
    except (ConfigError, DataError) as err:
        print(f"{PROG} grid: error: {err}", file=sys.stderr)
        return 2
    except (EpsilonCheckError, RuntimeError) as err:
        print(f"{PROG} grid: error: {err}", file=sys.stderr)
        return 1
    print(f"\nprivacy/utility trade-off (same data, seed {args.seed}); "
          f"{args.out / 'privacy_tradeoff.csv'}, {args.out / 'privacy_tradeoff.png'}\n")
    print(table_markdown(frame))
    print()
    for i, note in enumerate(footnotes(frame), 1):
        print(f"[{i}] {note}")
    bad = failed_checks(frame)
    if len(bad):
        print(f"{PROG} grid: error: epsilon check FAILED for {', '.join(bad['setting'])}: "
              "the table shows the largest candidate epsilon; see notes", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv) if argv[:1] == ["grid"] else (argv, [])
    p = parser()
    args = p.parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # dp_accounting reports every fractional RDP order it drops ("failed to converge");
    # dropping an order only loosens its bound, so the notes are noise here
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.command == "plan":
        return plan_command(args, p)
    if args.command == "audit":
        return audit_command(args, rest)
    return grid_command(args, overrides + list(args.overrides))


if __name__ == "__main__":
    raise SystemExit(main())
