"""Evaluation protocol: who is evaluated, on what, before and after adaptation.

Populations: ``warm`` (training clients' users, ranked on their last held-out items),
``cold`` (users held out inside training clients, adapted on a k-shot support set) and
``new-client`` (every user of a client that never trained). For each user the model is
scored at the meta-parameters ("before") and after ``finetune_steps`` inner steps on the
user's own support ("after"). Ranking is over the domain's whole catalogue with the user's
support items excluded, plus a sampled-100-negatives variant for comparison with papers.
"""

from __future__ import annotations

import torch

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.objective import Objective, Params
from fedmeta.data.tasks import ClientTasks, TaskTensors
from fedmeta.eval.metrics import (aggregate, full_ranking_metrics, sample_negatives,
                                  sampled_ranking_metrics)

SAMPLED_NEGATIVES = 100
CHUNK = 16


def _targets_and_masks(tasks: TaskTensors, n_items: int):
    """One row per (user, target): target index, exclusion mask, owning user."""
    rows, targets, owners = [], [], []
    for u, (tgts, seen) in enumerate(zip(tasks.eval_targets, tasks.seen)):
        for t in tgts:
            excl = torch.zeros(n_items, dtype=torch.bool)
            excl[seen] = True
            excl[[o for o in tgts if o != t]] = True
            rows.append(excl), targets.append(t), owners.append(u)
    return torch.tensor(targets), torch.stack(rows), torch.tensor(owners)


def user_scores(algorithm: Algorithm, params: Params, tasks: TaskTensors, client: ClientTasks,
                steps: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(users, n_items) scores, after ``steps`` adaptation steps per user (0 = none)."""
    obj = algorithm.objective
    all_feats = client.catalog.feats[: client.catalog.n_items].to(device)
    out = []
    for start in range(0, len(tasks), CHUNK):
        part = tasks.subset(range(start, min(start + CHUNK, len(tasks))))
        batch = Objective.batch(part, client.catalog, algorithm.cfg.negatives, gen, device)
        # only the token rows these users and the catalogue read: the same scores, less work
        cut = obj.compact(params, batch, all_feats)
        if steps > 0:
            phi = algorithm.adapt_users(cut.params, cut.batch, steps)
            phi = {k: v.detach() for k, v in phi.items()}
            s = obj.per_user_params(lambda p, u: obj.scores(p, u, cut.catalog), phi, cut.batch)
        else:
            s = obj.per_user(lambda p, u: obj.scores(p, u, cut.catalog), cut.params, cut.batch)
        out.append(s.detach().cpu())
    return torch.cat(out) if out else torch.zeros(0, client.catalog.n_items)


def rank_users(scores: torch.Tensor, tasks: TaskTensors, n_items: int,
               gen: torch.Generator) -> dict[str, float]:
    if len(tasks) == 0:
        return {}
    targets, exclude, owners = _targets_and_masks(tasks, n_items)
    per_row = scores[owners]
    metrics = full_ranking_metrics(per_row, targets, exclude)
    forbidden = exclude.clone()
    forbidden[torch.arange(len(targets)), targets] = True
    if int((~forbidden).sum(1).min()) >= SAMPLED_NEGATIVES:   # tiny catalogues: full ranking only
        neg = sample_negatives(n_items, forbidden, SAMPLED_NEGATIVES, gen)
        metrics.update(sampled_ranking_metrics(per_row, targets, neg))
    out = aggregate(metrics, owners)
    out["users"] = float(len(tasks))
    return out


def evaluate_client(algorithm: Algorithm, params: Params, client: ClientTasks, steps: int,
                    seed: int, device: torch.device, phases=("before", "after")) -> list[dict]:
    """Metric rows for one client: one per (population, phase, metric)."""
    rows = []
    pops = [("new-client", client.cold_eval)] if client.partition.new_client else [
        ("warm", client.warm_eval), ("cold", client.cold_eval)]
    for population, tasks in pops:
        for phase in phases:
            gen = torch.Generator().manual_seed(seed)
            n_steps = steps if phase == "after" else 0
            with torch.no_grad() if n_steps == 0 else torch.enable_grad():
                scores = user_scores(algorithm, params, tasks, client, n_steps, gen, device)
            for metric, value in rank_users(scores, tasks, client.catalog.n_items, gen).items():
                rows.append({"population": population, "stage": phase,
                             "domain": client.catalog.domain, "client": client.client_id,
                             "metric": metric, "value": value})
    return rows


def popularity_rows(clients: list[ClientTasks], seed: int) -> list[dict]:
    """The popularity baseline; it lives with the other baselines in
    :mod:`fedmeta.eval.baselines` (imported here lazily: that module builds on this one)."""
    from fedmeta.eval.baselines import popularity_rows as rows

    return rows(clients, seed)
