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
direction of norm C at every step (``filler="random"``), nothing (``"none"``: the mechanism
alone, the strongest attacker), or real per-user gradients of the fedmeta model
(``"model"``: the tiny model on a synthetic client, canaries on its parameters). Each
canary is scored by the inner product of the release with its direction; the k highest
scores are guessed "included", the k lowest "excluded", and the bound below turns the
number of correct guesses into epsilon.

The bound (the paper's main theorem, implemented from its statement). If the release is
(eps, delta)-DP in each canary, W is the number of correct guesses among r, and
f(v) = P[Binomial(r, p) >= v] with p = e^eps / (1 + e^eps), then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= m} (f(v - i) - f(v)) / i .

The delta term is kept (not approximated away): eps is ruled out when the right-hand side
is <= beta at some v' <= the observed W (the event W >= v' then has probability <= beta).
Candidate epsilons are scanned upwards on a grid of step 1/:data:`STEPS_PER_UNIT` and the
reported bound is the last one of the ruled-out prefix, so it is valid without assuming the
test is monotone in eps: if the truth is eps*, a report above eps* needs the first grid
point >= eps* (a valid (eps, delta) for the mechanism) to be ruled out, which has
probability <= beta.
Several guess counts k are tried, each at beta / (number of counts) (Bonferroni), and the
best is reported: the confidence stated is for the reported number.
"""

from __future__ import annotations

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
FILLER_KINDS = ("random", "none", "model")
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


# ---- the one-shot estimate (a second statistic, not a bound) -----------------------------
def _hockey_stick(eps: float, m1: float, s1: float, m0: float, s0: float) -> float:
    """delta(eps) of N(m1, s1^2) against N(m0, s0^2): P(R) - e^eps Q(R) on the region R where
    the log density ratio, a quadratic in x, exceeds eps (solved in closed form)."""
    a = 1 / (2 * s0 ** 2) - 1 / (2 * s1 ** 2)
    b = m1 / s1 ** 2 - m0 / s0 ** 2
    c = m0 ** 2 / (2 * s0 ** 2) - m1 ** 2 / (2 * s1 ** 2) + math.log(s0 / s1) - eps
    norm = stats.norm

    def gap(p: float, q: float) -> float:        # max(0, p - e^eps q) without overflow
        if q <= 0.0:
            return float(max(0.0, p))
        return float(max(0.0, p - math.exp(min(eps + math.log(q), 700.0))))

    if abs(s1 - s0) <= 1e-12 * max(s1, s0):                 # equal variances: a half-line
        if b == 0:
            return gap(1.0, 1.0) if c > 0 else 0.0
        t = -c / b
        return (gap(norm.sf(t, m1, s1), norm.sf(t, m0, s0)) if b > 0 else
                gap(norm.cdf(t, m1, s1), norm.cdf(t, m0, s0)))
    disc = b * b - 4 * a * c
    if disc <= 0:
        return gap(1.0, 1.0) if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    inside_p = norm.cdf(r2, m1, s1) - norm.cdf(r1, m1, s1)
    inside_q = norm.cdf(r2, m0, s0) - norm.cdf(r1, m0, s0)
    return gap(1 - inside_p, 1 - inside_q) if a > 0 else gap(inside_p, inside_q)


def gaussian_epsilon(m1: float, s1: float, m0: float, s0: float, delta: float) -> float:
    """The epsilon at ``delta`` between two Gaussians, both directions (bisection)."""
    def worst(eps: float) -> float:
        return max(_hockey_stick(eps, m1, s1, m0, s0), _hockey_stick(eps, m0, s0, m1, s1))

    if worst(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while worst(hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if worst(mid) > delta else (lo, mid)
    return hi


def one_shot_estimate(scores: torch.Tensor, included: torch.Tensor,
                      delta: float) -> tuple[float, float, float]:
    """After Andrew et al. (2023, "One-shot Empirical Privacy Estimation for Federated
    Learning"): model the scores of included and of excluded (never inserted) canaries as two
    Gaussians with one shared variance, and report the epsilon at ``delta`` between them,
    with a 90% interval from the standard error of the mean shift (epsilon grows with it).

    Shared, because under the Gaussian mechanism the two differ in the mean only; fitting
    each variance separately lets their sampling error (a few percent for 500 canaries)
    make the likelihood ratio quadratic and dominate epsilon at small delta. An estimate
    under a Gaussian assumption, not a bound: with m = 1000 the shift is known to about
    +-0.06 standard deviations, so at small epsilon a single run can land above the
    accountant's value.
    """
    x = scores.double().numpy()
    inc, exc = x[included.numpy()], x[~included.numpy()]
    if len(inc) < 2 or len(exc) < 2:
        return math.nan, math.nan, math.nan
    pooled = math.sqrt((((inc - inc.mean()) ** 2).sum() + ((exc - exc.mean()) ** 2).sum())
                       / (len(x) - 2))
    pooled = max(pooled, 1e-12 * max(1.0, float(np.abs(x).max())))
    shift = abs(float(inc.mean() - exc.mean())) / pooled
    se = math.sqrt(1 / len(inc) + 1 / len(exc))
    z = float(stats.norm.ppf(0.95))

    def eps(mu: float) -> float:
        return gaussian_epsilon(max(mu, 0.0), 1.0, 0.0, 1.0, delta)

    return eps(shift), eps(shift - z * se), eps(shift + z * se)


# ---- the mechanism ----------------------------------------------------------------------
def build_private_step(clip: float, n_users: int, sample_rate: float, noise_multiplier: float,
                       generator: torch.Generator) -> PrivateStep:
    """The one place the audit builds the privatiser it audits.

    ``generator`` is the step's only entropy (sample and noise). The audit is a simulation
    with synthetic canaries, so a seeded generator is fine here (it makes the table
    reproducible); a node seeds its own from the OS CSPRNG.
    """
    dp = LocalDPConfig(enabled=True, noise_multiplier=noise_multiplier, max_grad_norm=clip)
    return PrivateStep(dp, n_users, sample_rate, noise_multiplier, generator)


@dataclass(frozen=True)
class AuditSetup:
    canaries: int = 1000
    fillers: int = 1000
    dim: int = 0                  # 0: canaries + 1000 (dirac needs dim >= canaries); the
                                  # model's parameter count with model fillers
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
        if self.filler == "model" and self.canary != "dirac":
            raise ValueError("canary must be 'dirac' with model fillers (dense canaries over "
                             "every model parameter would not fit in memory)")
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


@dataclass(frozen=True)
class Canaries:
    """m fixed directions of norm ``norm`` in a flat space of size ``dim``: one coordinate
    each (dirac, stored as coordinates) or unit vectors in general position (dense)."""

    norm: float
    dim: int
    coords: torch.Tensor | None = None
    dense: torch.Tensor | None = None      # (m, dim), unit rows

    @classmethod
    def draw(cls, kind: str, m: int, dim: int, norm: float, gen: torch.Generator) -> "Canaries":
        if kind == "dirac":
            return cls(norm, dim, coords=torch.randperm(dim, generator=gen)[:m])
        dense = torch.randn(m, dim, generator=gen, dtype=torch.float64)
        return cls(norm, dim, dense=dense / dense.norm(dim=1, keepdim=True))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), dim) directions of the canaries ``idx`` (float32, norm ``norm``)."""
        if self.dense is not None:
            return (self.dense[idx] * self.norm).float()
        out = torch.zeros(len(idx), self.dim)
        out[torch.arange(len(idx)), self.coords[idx]] = self.norm
        return out

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        """Inner product of a flat release with every canary's unit direction."""
        flat = flat.double()
        return flat[self.coords] if self.dense is None else self.dense @ flat


class RandomFillers:
    """Fillers in a flat space: a fresh random direction of norm C per user and step."""

    def __init__(self, setup: "AuditSetup"):
        self.n, self.clip, self.random = setup.fillers, setup.clip, setup.filler == "random"
        self.like = {"w": torch.zeros(setup.width)}

    def directions(self, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d = self.like["w"].numel()
        if not self.random:
            return {"w": torch.zeros(0, d)}
        rows = torch.randn(len(idx), d, generator=gen)
        return {"w": rows * (self.clip / rows.norm(dim=1, keepdim=True).clamp_min(1e-30))}


class ModelFillers:
    """Fillers with real directions: the FedAvg gradients of the users of one synthetic
    client of the tiny fedmeta model, at its initial meta-parameters (every step; the
    mechanism does not depend on where the gradients were taken)."""

    OVERRIDES = ("data=synthetic_small", "model=tiny", "algorithm=fedavg")

    def __init__(self, setup: "AuditSetup"):
        from fedmeta.algorithms import FedAvg, Objective
        from fedmeta.data.silo import catalogue_sizes
        from fedmeta.model.recommender import build_model, meta_parameters, shared_item_rows
        from fedmeta.runtime.federation import build_silos
        from fedmeta.runtime.hydra_config import compose
        from fedmeta.runtime.node import build_tasks

        cfg = compose([*self.OVERRIDES, f"seed={setup.seed}"])
        silos = build_silos(cfg)
        sizes = catalogue_sizes(silos)
        self.tasks = build_tasks(cfg, silos[0], sizes)
        model = build_model(cfg.model, cfg.data.max_len, seed=cfg.seed,
                            item_rows=shared_item_rows(cfg.model, sizes))
        self.like = {k: v.detach().clone() for k, v in meta_parameters(model).items()}
        self.algorithm, self.objective = FedAvg(cfg.algorithm, Objective(model)), Objective
        self.negatives, self.n = cfg.algorithm.negatives, len(self.tasks.train)

    def directions(self, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if len(idx) == 0:
            return {k: v.new_zeros((0, *v.shape)) for k, v in self.like.items()}
        batch = self.objective.batch(self.tasks.train.subset(idx.tolist()), self.tasks.catalog,
                                     self.negatives, gen, torch.device("cpu"))
        with torch.no_grad():
            return {k: v.detach() for k, v in
                    self.algorithm.directions(self.like, batch).items()}


def fillers_for(setup: "AuditSetup"):
    return ModelFillers(setup) if setup.filler == "model" else RandomFillers(setup)


def _flat(d: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in like])


def _split(rows: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k, v in like.items():
        out[k] = rows[:, at:at + v.numel()].reshape(len(rows), *v.shape)
        at += v.numel()
    return out


def release(setup: "AuditSetup", noise_multiplier: float, canaries: Canaries,
            included: torch.Tensor, gen: torch.Generator, fillers=None,
            accountant: UserLevelAccountant | None = None) -> torch.Tensor:
    """The client's release, flat: the sum of its privatised steps over the whole run.

    The users are the fillers and the included canaries. The step is built with the
    nominal size fillers + m (a constant, not the number of canaries that happen to be in),
    so its scaling reveals nothing about which canaries were included.
    """
    fillers = fillers if fillers is not None else fillers_for(setup)
    like = fillers.like
    users_in = torch.nonzero(included).flatten()
    n_present = fillers.n + len(users_in)
    step = build_private_step(setup.clip, fillers.n + setup.canaries, setup.sample_rate,
                              noise_multiplier, gen)
    total = torch.zeros(canaries.dim, dtype=torch.float64)
    for _ in range(setup.total_steps):
        sampled = step.sample(n_present, 0, gen)
        own = fillers.directions(sampled[sampled < fillers.n], gen)
        planted = _split(canaries.rows(users_in[sampled[sampled >= fillers.n] - fillers.n]), like)
        per_user = {k: torch.cat([own[k].to(like[k].dtype), planted[k].to(like[k].dtype)])
                    for k in like}
        total += _flat(step.privatize(per_user, like), like).double()
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
    one_shot: float = math.nan     # Andrew et al.'s Gaussian estimate (not a bound) ...
    one_shot_low: float = math.nan  # ... and its 90% interval
    one_shot_high: float = math.nan
    fillers: int = 0               # the client's non-canary users
    dim: int = 0                   # size of the released direction
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
    fillers = fillers_for(setup)
    dim = sum(v.numel() for v in fillers.like.values())
    canaries = Canaries.draw(setup.canary, setup.canaries, dim,
                             setup.canary_norm * setup.clip, auditor)
    included = torch.rand(setup.canaries, generator=auditor) < 0.5
    acc = UserLevelAccountant(setup.mechanism, setup.delta)
    out = release(setup, noise_multiplier, canaries, included, mechanism, fillers, acc)
    scores = canaries.scores(out)
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
                       int(included.sum()), best["correct"], best["guesses"],
                       *one_shot_estimate(scores, included, setup.delta), fillers.n, dim,
                       per_count, time.perf_counter() - t0)


# ---- the report -------------------------------------------------------------------------
def _eps(v: float) -> str:
    return "∞" if math.isinf(v) else f"{v:.3f}"


def table_markdown(results: list[AuditResult]) -> str:
    lines = ["| ε (accountant) | ε (dp_accounting) | δ | σ | empirical ε lower bound | "
             "confidence | canaries | correct guesses / guesses | "
             "one-shot ε estimate (90% interval) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {_eps(r.epsilon)} | {_eps(r.epsilon_dp_accounting)} | {r.delta:.0e} | "
                     f"{r.noise_multiplier:.4f} | {r.lower_bound:.2f} | "
                     f"{100 * r.confidence:g}% | {r.canaries} | {r.correct} / {r.guesses} | "
                     f"{_eps(r.one_shot)} ({_eps(r.one_shot_low)}–{_eps(r.one_shot_high)}) |")
    return "\n".join(lines)


def violations(results: list[AuditResult]) -> list[AuditResult]:
    """Runs whose empirical lower bound exceeds either accountant's epsilon."""
    return [r for r in results if r.lower_bound > min(r.epsilon, r.epsilon_dp_accounting)]


def notes(setup: AuditSetup, fillers: int, dim: int) -> list[str]:
    k = setup.guess_counts()
    kind = {"random": "a fresh random direction of norm C per step",
            "none": "no direction (the mechanism alone)",
            "model": "FedAvg gradients of the tiny fedmeta model on a synthetic client"}
    return [
        f"One client, {fillers} filler users plus {setup.canaries} {setup.canary} canary "
        f"users (norm {setup.canary_norm:g} C, clipped to C = {setup.clip:g}), each canary "
        "included with probability 1/2; Poisson sampling at rate "
        f"{setup.sample_rate:g} over {setup.rounds} rounds x {setup.local_steps} local steps; "
        f"fillers: {kind[setup.filler]}; dimension {dim}. Released: the sum of the "
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
        "One-shot ε estimate: after Andrew et al. (2023): Gaussians with one shared variance "
        "fitted to the included and the excluded canaries' scores, ε at the same δ between "
        "them, with a 90% interval from the standard error of their mean shift. An estimate "
        "under a Gaussian model, not a bound: a single run may land above the accountant.",
    ]


def write_report(results: list[AuditResult], setup: AuditSetup, out_dir, command: str) -> None:
    """``audit.json`` (setup, every result with its per-guess-count detail) and ``audit.md``."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fillers, dim = (results[0].fillers, results[0].dim) if results else (setup.fillers, 0)
    setup_d = asdict(setup) | {"fillers": fillers, "dim": dim,
                               "guess_counts": setup.guess_counts()}
    (out / "audit.json").write_text(json.dumps(
        {"command": command, "setup": setup_d, "results": [r.as_dict() for r in results]},
        indent=1) + "\n")
    md = ["# Privacy audit\n", f"`{command}`\n", table_markdown(results), ""]
    md += [f"{i}. {n}" for i, n in enumerate(notes(setup, fillers, dim), 1)]
    (out / "audit.md").write_text("\n".join(md) + "\n")
