"""Empirical privacy audit of the local DP step: canary users, one run, a lower bound on epsilon.

The accountant's epsilon is an *upper* bound, proven for the mechanism as specified. An audit
checks the mechanism as *implemented*: it plants canary users, runs the client's privatised
steps once, and asks how well an attacker who sees the released result can tell which
canaries took part. Each good guess is evidence against small epsilons; the audit reports
the largest epsilon that the evidence rules out at confidence 1 - beta. If that lower bound
ever exceeds the accountant's epsilon, the implementation leaks more than it claims.

Method: the one-run audit of Steinke, Nasr & Jagielski (2023, "Privacy Auditing with One (1)
Training Run"). m canary users are each included independently with probability 1/2; the
client's users (fillers plus included canaries) are Poisson-sampled at rate q at every
step; every step is :meth:`~fedmeta.privacy.local.PrivateStep.privatize` (joint clipping to
C, N(0, sigma^2 C^2) noise on the sum, division by the expected batch); the release is the
sum of the rounds x local_steps privatised steps. A canary's direction is fixed and has norm
above C, so it is clipped to exactly C: the white-box "gradient canary" of DP-SGD audits.
With ``canary="dirac"`` each canary owns one coordinate (no two canaries interfere);
``"random"`` draws unit directions in general position. Fillers send a fresh random
direction of norm C at every step (``filler="random"``), or nothing (``"none"``: the
mechanism alone, the strongest attacker). Each canary is scored by the inner product of the
release with its direction; the k highest scores are guessed "included", the k lowest
"excluded", and the bound below turns the number of correct guesses into epsilon.

The bound (the paper's main theorem, implemented from its statement). If the release is
(eps, delta)-DP in each canary, W is the number of correct guesses among r, and
f(v) = P[Binomial(r, p) >= v] with p = e^eps / (1 + e^eps), then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= m} (f(v - i) - f(v)) / i .

The delta term is kept (not approximated away): eps is ruled out when the right-hand side
is <= beta at some v' <= the observed W (the event W >= v' then has probability <= beta).
Candidate epsilons are scanned upwards on a grid of step 1/:data:`STEPS_PER_UNIT` and the reported bound is
the last one of the ruled-out prefix, so it is valid without assuming the test is monotone
in eps: if the truth is eps*, a report above eps* needs the first grid point >= eps* (a
valid (eps, delta) for the mechanism) to be ruled out, which has probability <= beta.
Several guess counts k are tried, each at beta / (number of counts) (Bonferroni), and the
best is reported: the confidence stated is for the reported number.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import special, stats

from fedmeta.config import LocalDPConfig
from fedmeta.privacy.accounting import UserLevelAccountant, check_delta, check_mechanism
from fedmeta.privacy.local import PrivateStep
from fedmeta.privacy.planning import both_epsilons, noise_for_budget

log = logging.getLogger(__name__)

STEPS_PER_UNIT = 100           # the reported lower bound is a multiple of 1/100, rounded down
CANARY_KINDS = ("dirac", "random")
FILLER_KINDS = ("random", "none")
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)   # k per side, as a fraction of m


# ---- the bound --------------------------------------------------------------------------
def _tail(k, r: int, p):
    """P[Binomial(r, p) >= k], broadcast over k and p (bdtrc(j) = P[X > j])."""
    k = np.asarray(k)
    inner = special.bdtrc(np.clip(k - 1, 0, r), r, p)
    return np.where(k <= 0, 1.0, np.where(k > r, 0.0, inner))


def one_run_bound(v, guesses: int, canaries: int, delta: float, epsilon) -> np.ndarray:
    """The theorem's bound on P[W >= v] for an (epsilon, delta)-DP release.

    Broadcast: the result has shape (len(v), len(epsilon)). The maximum over i runs to
    min(m, v): past v every f(v - i) is 1, so the ratio only falls. Terms past a width w
    are at most 1 / (w + 1), so the width grows only until the maximum found reaches that.
    """
    r, m = int(guesses), int(canaries)
    vs = np.atleast_1d(np.asarray(v, dtype=np.int64))[:, None, None]
    p = special.expit(np.atleast_1d(np.asarray(epsilon, dtype=float)))[None, :, None]
    fv = _tail(vs, r, p)
    if delta == 0.0:
        return fv[:, :, 0]
    cap = max(1, min(m, int(vs.max())))
    width = min(cap, 64)
    while True:
        i = np.arange(1, width + 1)[None, None, :]
        best = ((_tail(vs - i, r, p) - fv) / i).max(axis=2)
        if width >= cap or bool((best * (width + 1) >= 1.0).all()):
            break
        width = min(cap, 4 * width)
    return fv[:, :, 0] + 2.0 * m * delta * best


def epsilon_lower_bound(correct: int, guesses: int, canaries: int, delta: float,
                        beta: float) -> float:
    """The largest grid epsilon ruled out by ``correct`` of ``guesses`` at level ``beta``.

    An epsilon is ruled out when the bound is <= beta at the observed count or at some
    smaller one (checked only when the observed count fails: the bound usually falls with
    v). 0 when not even epsilon = 0 is ruled out (no better than coin flips).
    """
    v, r, m = int(correct), int(guesses), int(canaries)
    if not (0 <= v <= r <= m and m >= 1):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    delta = 0.0 if delta == 0 else check_delta(delta)
    grid = np.arange(0, 100 * STEPS_PER_UNIT + 1) / STEPS_PER_UNIT
    # f(v) alone grows with epsilon (binomial tails are monotone in p) and the delta term is
    # >= 0, so nothing past the first grid point with f(v) > beta can be ruled out
    free = _tail(v, r, special.expit(grid)) <= beta
    grid = grid[:len(grid) if free.all() else int(np.argmin(free))]
    if not len(grid):
        return 0.0
    at_v = one_run_bound(v, r, m, delta, grid)[0] <= beta
    best = 0.0
    for eps, ok in zip(grid, at_v):
        if not ok:
            smaller = np.arange(1, v)
            smaller = smaller[_tail(smaller, r, special.expit(eps)) <= beta]
            if not (len(smaller) and (one_run_bound(smaller, r, m, delta, eps) <= beta).any()):
                break
        best = float(eps)
    return best


# ---- the mechanism ----------------------------------------------------------------------
def build_private_step(clip: float, n_users: int, sample_rate: float, noise_multiplier: float,
                       generator: torch.Generator) -> PrivateStep:
    """The one place the audit builds the privatiser it audits.

    ``generator`` is the step's only entropy (sample and noise). The audit is a simulation
    with synthetic canaries, so a seeded generator is fine here (it makes the table
    reproducible); a node seeds its own from the OS CSPRNG.
    """
    dp = LocalDPConfig(enabled=True, noise_multiplier=noise_multiplier, max_grad_norm=clip)
    params = inspect.signature(PrivateStep).parameters
    if "generator" in params:
        return PrivateStep(dp, n_users, sample_rate, noise_multiplier, generator=generator)
    # constructor of the previous release: an integer seed drawn from the generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return PrivateStep(dp, n_users, sample_rate, noise_multiplier,
                       UserLevelAccountant("rdp", 0.5), noise_seed=seed)


@dataclass(frozen=True)
class AuditSetup:
    canaries: int = 1000
    fillers: int = 1000
    dim: int = 0                  # 0: canaries + 1000 (dirac needs dim >= canaries)
    rounds: int = 10
    local_steps: int = 10
    sample_rate: float = 0.25
    delta: float = 1e-5
    clip: float = 1.0
    canary_norm: float = 2.0      # in units of clip; > 1 so every canary is clipped to C
    canary: str = "dirac"
    filler: str = "random"
    confidence: float = 0.95
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS
    mechanism: str = "rdp"
    seed: int = 0

    def __post_init__(self):
        for name in ("canaries", "rounds", "local_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.fillers, int) and self.fillers >= 0):
            raise ValueError(f"fillers must be an integer >= 0, got {self.fillers!r}")
        if self.canaries < 2:
            raise ValueError("canaries must be >= 2 (one guess each way)")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        check_delta(self.delta)
        check_mechanism(self.mechanism)
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be > 0, got {self.clip!r}")
        if not self.canary_norm >= 1.0:
            raise ValueError(f"canary_norm must be >= 1 (a canary at the clip bound or above), "
                             f"got {self.canary_norm!r}")
        if self.canary not in CANARY_KINDS:
            raise ValueError(f"canary must be one of {', '.join(CANARY_KINDS)}")
        if self.filler not in FILLER_KINDS:
            raise ValueError(f"filler must be one of {', '.join(FILLER_KINDS)}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if self.canary == "dirac" and 0 < self.dim < self.canaries:
            raise ValueError(f"dim ({self.dim}) must be >= canaries ({self.canaries}) for "
                             "dirac canaries (one coordinate each)")
        if self.dim < 0 or not self.guess_fractions:
            raise ValueError("dim must be >= 0 and guess_fractions non-empty")
        if any(not 0.0 < g <= 0.5 for g in self.guess_fractions):
            raise ValueError("guess_fractions must be in (0, 0.5]")

    @property
    def width(self) -> int:
        return self.dim or self.canaries + 1000

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def guess_counts(self) -> list[int]:
        """k per side; k + k <= m, so no canary is guessed both ways."""
        return sorted({max(1, min(self.canaries // 2, round(g * self.canaries)))
                       for g in self.guess_fractions})


def canary_directions(setup: AuditSetup, gen: torch.Generator) -> torch.Tensor:
    """(m, dim) fixed canary directions, each of norm canary_norm * C (> C: clipped to C)."""
    m, d = setup.canaries, setup.width
    if setup.canary == "dirac":
        coords = torch.randperm(d, generator=gen)[:m]
        out = torch.zeros(m, d, dtype=torch.float64)
        out[torch.arange(m), coords] = 1.0
    else:
        out = torch.randn(m, d, generator=gen, dtype=torch.float64)
        out /= out.norm(dim=1, keepdim=True)
    return out * (setup.canary_norm * setup.clip)


def release(setup: AuditSetup, noise_multiplier: float, canaries: torch.Tensor,
            included: torch.Tensor, gen: torch.Generator,
            accountant: UserLevelAccountant | None = None) -> torch.Tensor:
    """The client's release: the sum of its privatised steps over the whole run.

    The users are the fillers and the included canaries. The step is built with the
    nominal size fillers + m (a constant, not the number of canaries that happen to be in),
    so its scaling reveals nothing about which canaries were included.
    """
    d = setup.width
    users_in = torch.nonzero(included).flatten()
    n_present = setup.fillers + len(users_in)
    step = build_private_step(setup.clip, setup.fillers + setup.canaries, setup.sample_rate,
                              noise_multiplier, gen)
    like = {"w": torch.zeros(d, dtype=torch.float32)}
    total = torch.zeros(d, dtype=torch.float64)
    for _ in range(setup.total_steps):
        sampled = step.sample(n_present, 0, gen)
        fill = sampled[sampled < setup.fillers]
        canary_rows = canaries[users_in[sampled[sampled >= setup.fillers] - setup.fillers]]
        if setup.filler == "random":
            rows = torch.randn(len(fill), d, generator=gen)
            rows *= setup.clip / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        else:
            rows = torch.zeros(0, d)
        per_user = {"w": torch.cat([rows, canary_rows.float()])}
        total += step.privatize(per_user, like)["w"].double()
        if accountant is not None:
            accountant.step(noise_multiplier, setup.sample_rate, 1)
    return total


# ---- one audit --------------------------------------------------------------------------
@dataclass
class AuditResult:
    target_epsilon: float          # inf: no noise (sigma = 0, clipping only)
    noise_multiplier: float
    epsilon: float                 # the client accountant's (Opacus) epsilon for the run
    epsilon_dp_accounting: float
    delta: float
    lower_bound: float
    confidence: float
    canaries: int
    included: int
    correct: int
    guesses: int
    per_count: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}


def count_correct(scores: torch.Tensor, included: torch.Tensor, k: int) -> int:
    """Correct guesses when the k highest scores are called in and the k lowest out."""
    order = torch.argsort(scores, stable=True)
    low, high = order[:k], order[len(order) - k:]
    return int(included[high].sum()) + int((~included[low]).sum())


def audit(setup: AuditSetup, target_epsilon: float,
          noise_multiplier: float | None = None) -> AuditResult:
    """Audit the run planned for ``target_epsilon`` (inf: sigma = 0).

    ``noise_multiplier`` overrides the solved sigma (the accountant is charged with it).
    """
    t0 = time.perf_counter()
    if noise_multiplier is None:
        noise_multiplier = (0.0 if math.isinf(target_epsilon) else noise_for_budget(
            target_epsilon, setup.delta, setup.sample_rate, setup.total_steps,
            setup.mechanism))
    seeds = np.random.SeedSequence([setup.seed, 0 if math.isinf(target_epsilon)
                                    else int(round(target_epsilon * 1000)) + 1])
    audit_seed, mech_seed = (int(s.generate_state(1, np.uint64)[0] >> 1)
                             for s in seeds.spawn(2))
    auditor = torch.Generator().manual_seed(audit_seed)        # canaries and inclusion
    mechanism = torch.Generator().manual_seed(mech_seed)       # sampling, noise, fillers
    canaries = canary_directions(setup, auditor)
    included = torch.rand(setup.canaries, generator=auditor) < 0.5
    acc = UserLevelAccountant(setup.mechanism, setup.delta)
    out = release(setup, noise_multiplier, canaries, included, mechanism, acc)
    units = canaries / canaries.norm(dim=1, keepdim=True)
    scores = units @ out
    beta = (1.0 - setup.confidence) / len(setup.guess_counts())
    per_count, best = [], None
    for k in setup.guess_counts():
        correct = count_correct(scores, included, k)
        lb = epsilon_lower_bound(correct, 2 * k, setup.canaries, setup.delta, beta)
        per_count.append({"k": k, "correct": correct, "guesses": 2 * k, "lower_bound": lb})
        if best is None or lb > best["lower_bound"]:
            best = per_count[-1]
    eps = both_epsilons(acc.history, setup.delta, setup.mechanism)
    return AuditResult(target_epsilon, float(noise_multiplier), eps.opacus, eps.dp_accounting,
                       setup.delta, best["lower_bound"], setup.confidence, setup.canaries,
                       int(included.sum()), best["correct"], best["guesses"], per_count,
                       time.perf_counter() - t0)


# ---- the report -------------------------------------------------------------------------
def _eps(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.3f}"


def table_markdown(results: list[AuditResult]) -> str:
    lines = ["| ε (accountant) | ε (dp_accounting) | δ | σ | empirical ε lower bound | "
             "confidence | canaries | correct guesses / guesses |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {_eps(r.epsilon)} | {_eps(r.epsilon_dp_accounting)} | {r.delta:.0e} | "
                     f"{r.noise_multiplier:.4f} | {r.lower_bound:.2f} | "
                     f"{100 * r.confidence:g}% | {r.canaries} | {r.correct} / {r.guesses} |")
    return "\n".join(lines)


def violations(results: list[AuditResult]) -> list[AuditResult]:
    """Runs whose empirical lower bound exceeds either accountant's epsilon."""
    return [r for r in results if r.lower_bound > min(r.epsilon, r.epsilon_dp_accounting)]


def notes(setup: AuditSetup) -> list[str]:
    k = setup.guess_counts()
    return [
        f"One client, {setup.fillers} filler users plus {setup.canaries} {setup.canary} canary "
        f"users (norm {setup.canary_norm:g} C, clipped to C = {setup.clip:g}), each canary "
        "included with probability 1/2; Poisson sampling at rate "
        f"{setup.sample_rate:g} over {setup.rounds} rounds x {setup.local_steps} local steps; "
        f"fillers: {setup.filler}; dimension {setup.width}. Released: the sum of the "
        "privatised steps (PrivateStep.privatize).",
        "Empirical ε lower bound: Steinke, Nasr & Jagielski (2023), one run, δ term kept; "
        f"k = {', '.join(map(str, k))} guesses each way, each at "
        f"β = {(1 - setup.confidence):g}/{len(k)} (Bonferroni), the best reported; rounded "
        f"down to 1/{STEPS_PER_UNIT}. It is a lower bound holding with the stated confidence, "
        "not an estimate of ε: one-run audits of subsampled DP-SGD sit well below the "
        "accountant's ε even for a correct mechanism.",
        "ε (accountant): the client's Opacus accountant for the run; ε (dp_accounting): the "
        "same history in Google's dp_accounting; both at the δ beside them. σ: noise "
        "multiplier solved for the target on the larger of the two (0 for ∞: clipping only).",
    ]


def write_report(results: list[AuditResult], setup: AuditSetup, out_dir, command: str) -> None:
    """``audit.json`` (setup, every result with its per-guess-count detail) and ``audit.md``."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_d = asdict(setup) | {"dim": setup.width, "guess_counts": setup.guess_counts()}
    (out / "audit.json").write_text(json.dumps(
        {"command": command, "setup": setup_d, "results": [r.as_dict() for r in results]},
        indent=1) + "\n")
    md = ["# Privacy audit\n", f"`{command}`\n", table_markdown(results), ""]
    md += [f"{i}. {n}" for i, n in enumerate(notes(setup), 1)]
    (out / "audit.md").write_text("\n".join(md) + "\n")
