"""Top-k ranking metrics for next-item recommendation, per held-out target.

Two protocols are supported. *Full ranking* scores the target against the domain's whole
catalogue (minus the items the user already revealed), which is the honest number;
*sampled ranking* scores it against ``m`` sampled negatives, which is only kept so results
can be put next to papers that report it (it is known to overstate quality and even to
reorder methods).

Ties are broken against the target (pessimistic rank). A model that gives many items the
same score has not told them apart, so it must not be rewarded for it: a constant scorer
gets the worst possible rank instead of a lucky first place, and a model that collapses to
constant outputs (or emits NaN, which is treated as the lowest score) cannot look good.

Every function returns one value per target; :func:`aggregate` averages per user first and
then over users, so a handful of heavy users with many targets cannot dominate the mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_KS = (5, 10, 20)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: every cutoff must be a positive int, got {ks!r}")
    return ks


def _check_scores_targets(scores: Tensor, targets: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores: expected a 2-D (n, n_items) tensor, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores: expected a floating-point tensor, got {scores.dtype}")
    if not isinstance(targets, Tensor) or targets.dim() != 1 or len(targets) != len(scores):
        raise ValueError(f"targets: expected a 1-D tensor of length {len(scores)} (rows of "
                         f"scores), got {getattr(targets, 'shape', type(targets).__name__)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected integer item indices, got {targets.dtype}")
    targets = targets.to(scores.device, torch.long)
    n_items = scores.shape[1]
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        bad = int(torch.nonzero((targets < 0) | (targets >= n_items))[0, 0])
        raise ValueError(f"targets: row {bad} holds item {int(targets[bad])}, outside "
                         f"[0, {n_items}) (the columns of scores)")
    return targets


def _clean(scores: Tensor) -> Tensor:
    """NaN scores become -inf so that, with pessimistic ties, they can never win."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        log.warning("%d NaN scores ranked as the lowest possible score", int(nan.sum()))
        scores = scores.masked_fill(nan, -math.inf)
    return scores


def _from_counts(at_least: Tensor, below: Tensor, ties: Tensor, n_other: Tensor,
                 ks: tuple[int, ...], dtype: torch.dtype, suffix: str = "") -> dict[str, Tensor]:
    """Metrics from, per target, how many candidates score >=, < and == the target."""
    rank = (1 + at_least).to(dtype)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = rank <= k
        out[f"hr@{k}{suffix}"] = hit.to(dtype)
        out[f"ndcg@{k}{suffix}"] = torch.where(hit, 1.0 / torch.log2(rank + 1),
                                               torch.zeros_like(rank))
    out[f"mrr{suffix}"] = 1.0 / rank
    empty = n_other == 0
    if bool(empty.any()):
        log.warning("%d targets had no candidate to rank against; their auc is set to 1.0 "
                    "(consistent with rank 1)", int(empty.sum()))
    auc = (below.to(dtype) + 0.5 * ties.to(dtype)) / n_other.clamp(min=1).to(dtype)
    out[f"auc{suffix}"] = torch.where(empty, torch.ones_like(auc), auc)
    return out


def full_ranking_metrics(scores: Tensor, targets: Tensor, exclude: Tensor,
                         ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Rank each target against every non-excluded item of the catalogue.

    ``scores`` is (n, n_items), ``targets`` (n,) item indices, ``exclude`` (n, n_items) bool:
    items that must not compete with the target (what the user already revealed, and the
    user's other held-out targets, which are correct answers too). The target itself is
    never excluded, even when marked, so callers can build one mask per user and reuse it.

    rank = 1 + #(non-excluded items other than the target with score >= target score).
    Returns (n,) tensors ``hr@k``, ``ndcg@k`` (1/log2(rank+1) within the cutoff),
    ``mrr`` (1/rank) and ``auc`` (share of candidates scored strictly below the target,
    ties counting one half).
    """
    ks = _check_ks(ks)
    targets = _check_scores_targets(scores, targets)
    if (not isinstance(exclude, Tensor) or exclude.dtype != torch.bool
            or exclude.shape != scores.shape):
        raise ValueError(f"exclude: expected a bool tensor of shape {tuple(scores.shape)} "
                         f"(like scores), got {getattr(exclude, 'dtype', type(exclude).__name__)}"
                         f" {tuple(getattr(exclude, 'shape', ()))}")
    scores = _clean(scores)
    rows = torch.arange(len(targets), device=scores.device)
    candidate = ~exclude.to(scores.device)
    candidate[rows, targets] = False
    target_score = scores[rows, targets].unsqueeze(1)
    at_least = ((scores >= target_score) & candidate).sum(1)
    below = ((scores < target_score) & candidate).sum(1)
    ties = ((scores == target_score) & candidate).sum(1)
    return _from_counts(at_least, below, ties, candidate.sum(1), ks, scores.dtype)


def sampled_ranking_metrics(scores: Tensor, targets: Tensor, negatives: Tensor,
                            ks: Sequence[int] = DEFAULT_KS) -> dict[str, Tensor]:
    """Rank each target among itself and its ``m`` sampled negatives (columns of ``negatives``).

    Same rank and tie rule as :func:`full_ranking_metrics`; keys carry the suffix ``_s{m}``
    (``hr@10_s100``) so the two protocols can never be confused in a results table.
    """
    ks = _check_ks(ks)
    targets = _check_scores_targets(scores, targets)
    if (not isinstance(negatives, Tensor) or negatives.dim() != 2
            or len(negatives) != len(scores) or negatives.shape[1] == 0):
        raise ValueError(f"negatives: expected a (n={len(scores)}, m>=1) tensor of item indices, "
                         f"got {getattr(negatives, 'shape', type(negatives).__name__)}")
    if negatives.is_floating_point() or negatives.dtype == torch.bool:
        raise ValueError(f"negatives: expected integer item indices, got {negatives.dtype}")
    negatives = negatives.to(scores.device, torch.long)
    n_items, m = scores.shape[1], negatives.shape[1]
    if negatives.numel() and (int(negatives.min()) < 0 or int(negatives.max()) >= n_items):
        raise ValueError(f"negatives: item indices must lie in [0, {n_items}), got "
                         f"[{int(negatives.min())}, {int(negatives.max())}]")
    clash = (negatives == targets.unsqueeze(1)).any(1)
    if bool(clash.any()):
        row = int(torch.nonzero(clash)[0, 0])
        raise ValueError(f"negatives: row {row} contains its own target {int(targets[row])}")
    scores = _clean(scores)
    rows = torch.arange(len(targets), device=scores.device)
    target_score = scores[rows, targets].unsqueeze(1)
    neg = scores.gather(1, negatives)
    at_least = (neg >= target_score).sum(1)
    below = (neg < target_score).sum(1)
    ties = (neg == target_score).sum(1)
    n_other = torch.full_like(at_least, m)
    return _from_counts(at_least, below, ties, n_other, ks, scores.dtype, f"_s{m}")


def sample_negatives(n_items: int, forbidden: list[set[int]] | Tensor, m: int,
                     generator: torch.Generator) -> Tensor:
    """(n, m) item indices drawn uniformly without replacement from the allowed items.

    ``forbidden`` is one set of item indices per row, or an (n, n_items) bool mask. Sorting
    i.i.d. uniform keys gives a uniform random subset, so one vectorised top-k replaces a
    Python loop over rows. The result lives on the generator's device.
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m: must be a positive int, got {m!r}")
    if not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items: must be a positive int, got {n_items!r}")
    device = generator.device
    if isinstance(forbidden, Tensor):
        if forbidden.dtype != torch.bool or forbidden.dim() != 2 or forbidden.shape[1] != n_items:
            raise ValueError(f"forbidden: expected a bool (n, {n_items}) mask, got "
                             f"{forbidden.dtype} {tuple(forbidden.shape)}")
        mask = forbidden.to(device)
    else:
        mask = torch.zeros(len(forbidden), n_items, dtype=torch.bool, device=device)
        for row, items in enumerate(forbidden):
            items = list(items)
            if items and (min(items) < 0 or max(items) >= n_items):
                raise ValueError(f"forbidden: row {row} holds item indices outside "
                                 f"[0, {n_items})")
            mask[row, items] = True
    allowed = (~mask).sum(1)
    if len(allowed) and int(allowed.min()) < m:
        row = int(torch.argmin(allowed))
        raise ValueError(f"m: cannot draw {m} distinct negatives, row {row} has only "
                         f"{int(allowed[row])} allowed items out of {n_items}")
    keys = torch.rand(mask.shape, generator=generator, device=device)
    keys = keys.masked_fill(mask, -1.0)
    return keys.topk(m, dim=1).indices


def aggregate(per_target: dict[str, Tensor], groups: Tensor) -> dict[str, float]:
    """Mean over users of each user's mean over their targets.

    ``groups`` gives the user of each target. Averaging per user first gives every user
    the same weight: otherwise users with many held-out targets would set the score, and
    the metric would describe the heaviest users rather than the population.
    """
    if not isinstance(groups, Tensor) or groups.dim() != 1:
        raise ValueError(f"groups: expected a 1-D tensor of user indices, got "
                         f"{getattr(groups, 'shape', type(groups).__name__)}")
    if len(groups) == 0:
        raise ValueError("groups: no targets to aggregate")
    _, inverse = torch.unique(groups, return_inverse=True)
    n_users = int(inverse.max()) + 1
    counts = torch.bincount(inverse, minlength=n_users).to(torch.float64)
    out: dict[str, float] = {}
    for name, values in per_target.items():
        if not isinstance(values, Tensor) or values.shape != groups.shape:
            raise ValueError(f"per_target[{name!r}]: expected shape {tuple(groups.shape)} "
                             f"(one value per target, like groups), got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        sums = torch.zeros(n_users, dtype=torch.float64, device=values.device)
        sums.index_add_(0, inverse.to(values.device), values.to(torch.float64))
        out[name] = float((sums / counts.to(values.device)).mean())
    return out
