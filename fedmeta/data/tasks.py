"""Client partitions -> user tasks (one user = one meta-learning task), as padded tensors.

Every user's history becomes one row: ``inputs`` = [BOS, i0, ..., i_{n-2}] and
``targets`` = [i0, ..., i_{n-1}], so position t predicts item t from everything before it.
The temporal support/query split is a pair of masks over target positions (support = the
earlier part), which lets one causal forward pass serve both the inner loop (support loss)
and the outer step (query loss at the adapted parameters).

Histories are de-duplicated (first occurrence of each item kept, repeats counted in the log)
because evaluation ranks items the user has *not* seen; training on repeats the evaluation
can never reward would only blur the objective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fedmeta.data.partition import ClientPartition

log = logging.getLogger(__name__)

MAX_EVAL_TARGETS = 10   # later items ranked per evaluated user


@dataclass
class Catalog:
    """A domain's item catalogue: the ranking universe and the feature table."""

    domain: str
    items: list[str]
    feats: torch.Tensor            # (n_items + 2, width): items, then PAD, then BOS

    def __post_init__(self):
        self.index = {item: i for i, item in enumerate(self.items)}

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def pad(self) -> int:
        return self.n_items

    @property
    def bos(self) -> int:
        return self.n_items + 1


@dataclass
class TaskTensors:
    """Padded per-user rows; ``support``/``query`` mark which target positions belong where."""

    users: list[str]
    inputs: torch.Tensor
    targets: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor
    eval_pos: torch.Tensor         # position whose hidden state ranks the evaluation targets
    eval_targets: list[list[int]] = field(default_factory=list)
    seen: list[list[int]] = field(default_factory=list)   # excluded from ranking

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, idx) -> "TaskTensors":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = idx.tolist()
        return TaskTensors([self.users[i] for i in pick], self.inputs[idx], self.targets[idx],
                           self.support[idx], self.query[idx], self.eval_pos[idx],
                           [self.eval_targets[i] for i in pick] if self.eval_targets else [],
                           [self.seen[i] for i in pick] if self.seen else [])


@dataclass
class ClientTasks:
    """Everything one client holds: its catalogue, training tasks and evaluation sets."""

    partition: ClientPartition
    catalog: Catalog
    train: TaskTensors             # warm users' training histories (support/query split)
    warm_eval: TaskTensors         # warm users: adapt on their history, rank held-out items
    cold_eval: TaskTensors         # cold-start users (k-shot support), or all users of a new client

    @property
    def client_id(self) -> str:
        return self.partition.client_id

    @property
    def num_tasks(self) -> int:
        return len(self.train)


def user_sequences(interactions: pd.DataFrame, catalog: Catalog) -> dict[str, list[int]]:
    """Time-ordered, de-duplicated item indices per user of one domain."""
    frame = interactions.sort_values(["user", "timestamp"], kind="stable")
    n = len(frame)
    frame = frame.drop_duplicates(["user", "item"], keep="first")
    if len(frame) < n:
        log.info("domain %s: %d repeat interactions collapsed to first occurrence",
                 catalog.domain, n - len(frame))
    idx = frame["item"].map(catalog.index)
    return {user: idx.loc[grp.index].astype(int).tolist()
            for user, grp in frame.groupby("user", sort=False)}


def _rows(seqs: list[list[int]], split: list[int], max_len: int, catalog: Catalog):
    """Pack sequences (already truncated to max_len) into tensors; split = support length."""
    n_users = len(seqs)
    inputs = torch.full((n_users, max_len), catalog.pad, dtype=torch.long)
    targets = torch.full((n_users, max_len), catalog.pad, dtype=torch.long)
    support = torch.zeros(n_users, max_len, dtype=torch.bool)
    query = torch.zeros(n_users, max_len, dtype=torch.bool)
    eval_pos = torch.zeros(n_users, dtype=torch.long)
    for u, (seq, s) in enumerate(zip(seqs, split)):
        n = len(seq)
        inputs[u, 0] = catalog.bos
        inputs[u, 1:n] = torch.tensor(seq[:-1], dtype=torch.long) if n > 1 else inputs[u, 1:1]
        targets[u, :n] = torch.tensor(seq, dtype=torch.long)
        support[u, :s] = True
        query[u, s:n] = True
        eval_pos[u] = n - 1
    return inputs, targets, support, query, eval_pos


def training_tasks(users: list[str], seqs: dict[str, list[int]], catalog: Catalog,
                   max_len: int, support_fraction: float, n_test: int) -> TaskTensors:
    """Warm users' histories minus their last ``n_test`` items (those are for evaluation)."""
    kept, split, names, skipped = [], [], [], 0
    for user in users:
        seq = seqs[user][: max(len(seqs[user]) - n_test, 1)][-max_len:]
        if len(seq) < 2:
            skipped += 1
            continue
        s = min(max(1, round(len(seq) * support_fraction)), len(seq) - 1)
        kept.append(seq), split.append(s), names.append(user)
    if skipped:
        log.info("%s: %d warm users have < 2 training interactions and form no task",
                 catalog.domain, skipped)
    return TaskTensors(names, *_rows(kept, split, max_len, catalog))


def eval_tasks(users: list[str], seqs: dict[str, list[int]], catalog: Catalog, max_len: int,
               support_len, label: str) -> TaskTensors:
    """Support = first ``support_len(seq)`` items; targets = later items the user has not seen."""
    kept, split, names, targets, seen, skipped = [], [], [], [], [], 0
    for user in users:
        seq = seqs[user]
        s = support_len(seq)
        history = seq[:s][-(max_len - 1):]
        hist_set = set(seq[:s])
        later = [i for i in seq[s:] if i not in hist_set][:MAX_EVAL_TARGETS]
        if not history or not later:
            skipped += 1
            continue
        kept.append(history), split.append(len(history)), names.append(user)
        targets.append(later), seen.append(sorted(hist_set))
    if skipped:
        log.info("%s %s: %d users without support or unseen later items are not evaluated",
                 catalog.domain, label, skipped)
    # a trailing PAD target makes the last input position (the one that ranks) part of the row
    inputs, tgt, support, query, eval_pos = _rows([h + [catalog.pad] for h in kept], split,
                                                  max_len, catalog)
    query.zero_()   # evaluation targets are ranked, never trained on
    return TaskTensors(names, inputs, tgt, support, query, eval_pos, targets, seen)


def build_client_tasks(partition: ClientPartition, seqs: dict[str, list[int]], catalog: Catalog,
                       max_len: int, support_fraction: float, n_test: int, k_shot: int,
                       max_eval_users: int = 0, seed: int = 0) -> ClientTasks:
    rng = np.random.default_rng(seed)

    def cap(users):
        users = list(users)
        if max_eval_users and len(users) > max_eval_users:
            users = sorted(rng.choice(users, max_eval_users, replace=False).tolist())
        return users

    warm = [] if partition.new_client else list(partition.train_users)
    train = training_tasks(warm, seqs, catalog, max_len, support_fraction, n_test)
    warm_eval = eval_tasks(cap(warm), seqs, catalog, max_len,
                           lambda seq: max(len(seq) - n_test, 1), "warm")
    cold_eval = eval_tasks(cap(partition.cold_users), seqs, catalog, max_len,
                           lambda seq: min(k_shot, len(seq) - 1), "cold")
    return ClientTasks(partition, catalog, train, warm_eval, cold_eval)
