"""fedmeta's per-domain split as RecBole atomic files, so RecBole's SASRec sees exactly it.

Runs in fedmeta's venv. The users and items come from the same path a node takes: the
composed config -> ``build_silos`` -> ``build_tasks`` per silo (the ``ClientTasks`` a node
trains and evaluates on, evaluation-user sampling included). Domains
have disjoint catalogues, so each domain becomes one RecBole data set with a pre-split
benchmark (``<name>.train.inter``, ``.valid.inter``, ``.test.inter``) plus ``<name>.item``
listing the whole catalogue (fedmeta ranks every catalogue item; RecBole ranks the items it
knows, so the never-interacted ones must be declared).

RecBole reads a pre-split sequential benchmark as ready-made samples, one per row:
``user_id:token  item_id_list:token_seq  item_id:token`` (history, next item); it does no
augmentation of its own. So:

- **train**: what fedmeta's learners see, as next-item samples. Each training user's task
  sequence (its history minus the last ``n_test`` items, the most recent ``max_len`` kept:
  the rows of ``ClientTasks.train``) gives one row per prefix of length >= 1; each evaluated
  cold / new-client user's k-shot support gives its prefixes too (fedmeta adapts on it).
  fedmeta also trains position 0 (first item from BOS alone); RecBole cannot take an empty
  history, so that one target per sequence is not a RecBole sample.
- **valid**: a seeded ``valid_fraction`` of the training users with >= 3 task items, drawn
  from the training users alone (never from who is evaluated): their last task item is the
  validation target and leaves their train rows (leave-last-out), so early stopping never
  sees a test target and never a validation target it trained on.
- **test**: exactly fedmeta's evaluation rows: per evaluated user (warm, cold, new-client)
  one row per target, the history being the support fedmeta ranks from (its last
  ``max_len - 1`` items, as in the task tensors).

What is excluded from ranking cannot be said in the atomic files (RecBole's full sort for
sequential models excludes nothing), so the manifest carries, per evaluated user, the items
fedmeta excludes (its support, ``seen``) and its targets (each target's row excludes the
user's other targets, as fedmeta does); the RecBole runner applies them. Users and items
are written as opaque tokens (``u<n>``, the item's catalogue index); the manifest maps them
back to fedmeta's user ids, clients and populations.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

FORMAT = 1
INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
ITEM_HEADER = "item_id:token"
SPLITS = ("train", "valid", "test")
VALID_FRACTION = 0.1


class ExportError(ValueError):
    """The composed federation cannot be written as one RecBole data set per domain."""


def compose(overrides: list[str]):
    from fedmeta.runtime.hydra_config import compose as hydra_compose

    return hydra_compose(list(overrides))


def client_tasks(cfg) -> list:
    """Every client's ``ClientTasks`` as its node builds them (federation order).

    A node calls ``build_tasks`` on its run config's view, whose seed and task keys
    (``max_len``, ``support_fraction``, ``k_shot``, ``n_test``, ``max_eval_users``) are the
    composed config's, so the users, splits and sampled evaluation users are the node's.
    The item features (which the export does not use) are built without the shared-ID column."""
    from fedmeta.runtime.federation import build_silos
    from fedmeta.runtime.node import build_tasks

    return [build_tasks(cfg, silo) for silo in build_silos(cfg)]


def task_sequence(tasks, u: int) -> list[int]:
    """Training row ``u`` as the item sequence it trains on (its target positions)."""
    mask = tasks.support[u] | tasks.query[u]
    return tasks.targets[u][mask].tolist()


def eval_history(tasks, u: int) -> list[int]:
    """Evaluation row ``u``'s support: the items the model adapts on and ranks from."""
    return tasks.targets[u][tasks.support[u]].tolist()


def prefixes(seq: list[int]) -> list[tuple[list[int], int]]:
    """Next-item samples of a sequence: (items before t, item t) for t >= 1."""
    return [(seq[:t], seq[t]) for t in range(1, len(seq))]


def valid_users(users: list[str], lengths: list[int], fraction: float, seed: int,
                domain: str) -> set[str]:
    """The validation slice: seeded, drawn only from training users with >= 3 task items."""
    eligible = sorted(u for u, n in zip(users, lengths) if n >= 3)
    if not eligible or fraction <= 0:
        return set()
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    k = max(1, round(fraction * len(eligible)))
    return set(rng.choice(eligible, size=min(k, len(eligible)), replace=False).tolist())


def domain_split(clients: list, seed: int, valid_fraction: float = VALID_FRACTION) -> dict:
    """One domain's rows and manifest (no files): ``{"train", "valid", "test", "manifest"}``."""
    domain = clients[0].catalog.domain
    items = clients[0].catalog.items
    for c in clients[1:]:
        if c.catalog.items != items:
            raise ExportError(f"domain {domain}: client {c.client_id} has another catalogue "
                              f"than {clients[0].client_id}; one RecBole data set needs one")
    tokens: dict[str, str] = {}
    users: dict[str, dict] = {}

    def token(user: str, client, population: str | None) -> str:
        if user not in tokens:
            tokens[user] = f"u{len(tokens)}"
            users[tokens[user]] = {"user": user, "client": client.client_id,
                                   "new_client": bool(client.partition.new_client)}
        if population is not None:
            users[tokens[user]]["population"] = population
        return tokens[user]

    train_seqs = [(c, name, task_sequence(c.train, u))
                  for c in clients for u, name in enumerate(c.train.users)]
    held = valid_users([n for _, n, _ in train_seqs], [len(s) for _, _, s in train_seqs],
                       valid_fraction, seed, domain)
    rows = {s: [] for s in SPLITS}
    for c, name, seq in train_seqs:
        tok = token(name, c, None)
        if name in held:
            rows["valid"].append((tok, seq[:-1], seq[-1]))
            seq = seq[:-1]
        rows["train"] += [(tok, h, t) for h, t in prefixes(seq)]
    evaluated = []
    for c in clients:
        pops = ([("new-client", c.cold_eval)] if c.partition.new_client
                else [("warm", c.warm_eval), ("cold", c.cold_eval)])
        for population, tasks in pops:
            for u, name in enumerate(tasks.users):
                tok = token(name, c, population)
                history = eval_history(tasks, u)
                if population != "warm":        # the k-shot support fedmeta adapts on
                    rows["train"] += [(tok, h, t) for h, t in prefixes(history)]
                targets = list(tasks.eval_targets[u])
                rows["test"] += [(tok, history, t) for t in targets]
                evaluated.append({"token": tok, "population": population,
                                  "client": c.client_id, "history": history,
                                  "seen": list(tasks.seen[u]), "targets": targets})
    counts = {p: {"users": sum(e["population"] == p for e in evaluated),
                  "targets": sum(len(e["targets"]) for e in evaluated if e["population"] == p)}
              for p in ("warm", "cold", "new-client")}
    manifest = {"format": FORMAT, "domain": domain, "n_items": len(items),
                "rows": {s: len(r) for s, r in rows.items()}, "valid_fraction": valid_fraction,
                "valid_users": sorted(tokens[u] for u in held), "populations": counts,
                "users": users, "evaluated": evaluated}
    return {**rows, "manifest": manifest}


def _line(row: tuple[str, list[int], int]) -> str:
    tok, history, target = row
    if not history:
        raise ExportError(f"user token {tok}: a row without history (RecBole needs one)")
    return f"{tok}\t{' '.join(map(str, history))}\t{target}"


def write_domain(split: dict, root: Path, name: str) -> Path:
    """``root/name/name.{train,valid,test}.inter``, ``name.item``, ``manifest.json``."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        if not split[s]:
            raise ExportError(f"{name}: the {s} split is empty")
        body = "\n".join(_line(r) for r in split[s])
        (d / f"{name}.{s}.inter").write_text(f"{INTER_HEADER}\n{body}\n")
    n_items = split["manifest"]["n_items"]
    (d / f"{name}.item").write_text(ITEM_HEADER + "\n" + "\n".join(map(str, range(n_items)))
                                    + "\n")
    (d / "manifest.json").write_text(json.dumps({**split["manifest"], "dataset": name}))
    return d


def export(overrides: list[str], root: str | Path, valid_fraction: float = VALID_FRACTION
           ) -> list[dict]:
    """Compose, build every node's tasks, write one RecBole data set per domain.

    Returns per domain: dataset name, directory, and the manifest's counts."""
    cfg = compose(overrides)
    clients = client_tasks(cfg)
    by_domain: dict[str, list] = {}
    for c in clients:
        by_domain.setdefault(c.catalog.domain, []).append(c)
    out = []
    for domain, group in by_domain.items():
        split = domain_split(group, cfg.seed, valid_fraction)
        name = f"fm-{domain}"
        m = split["manifest"]
        m.update({"overrides": list(overrides), "seed": cfg.seed, "max_len": cfg.data.max_len})
        d = write_domain(split, Path(root), name)
        out.append({"dataset": name, "domain": domain, "dir": str(d), "rows": m["rows"],
                    "populations": m["populations"], "n_items": m["n_items"],
                    "max_len": cfg.data.max_len, "seed": cfg.seed})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for the data sets (one per domain)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedmeta-simulate")
    p.add_argument("--valid-fraction", type=float, default=VALID_FRACTION)
    a = p.parse_args(argv)
    print(json.dumps(export(a.overrides, a.out, a.valid_fraction)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
