"""RecBole 1.2.1's SASRec on one exported fedmeta domain (runs inside RecBole's own venv).

``python -m bench.peer.recbole_sasrec DATASET_DIR OUT.json --seed S [--epochs N]
[--stopping-step K] [--budget-s T]``: DATASET_DIR is one data set written by
:mod:`bench.peer.recbole_export` (its atomic files and ``manifest.json``). Prints one JSON
line and writes it to OUT.json: ``epochs_run`` and ``best_epoch`` (1-based), ``stop`` (``early``:
RecBole's early stop; ``cap``: the epoch cap; ``budget``: out of time, scored at its best
epoch so far), and per population the figures below.

What is RecBole's: the data set loading (pre-split benchmark files), SASRec with the
cross-entropy loss over the whole catalogue (``loss_type: CE``, no negative sampling), its
``Trainer`` (Adam, its default hyper-parameters, validation every epoch, early stop after
``stopping_step`` epochs without a better valid NDCG@10, the best epoch's weights reloaded
for testing), and the full-ranking evaluator (``eval_args.mode: full``, NDCG@10 / Hit@10).

One change to its evaluation, so the number means what fedmeta's does: RecBole's full sort
for *sequential* models masks nothing (its data loader hands the trainer no history), while
fedmeta ranks each target against the catalogue minus the user's support items and minus the
user's other targets. :class:`ExcludingLoader` supplies exactly those items through the
``history_index`` RecBole's trainer already masks for general models; validation rows mask
their own history likewise. The unmasked stock figure is reported beside it (``*_stock``).

RecBole's evaluator averages over test rows (one per target); fedmeta averages per user first,
then over users. Both are reported: ``ndcg@10`` / ``hr@10`` are RecBole's evaluator on each
population's rows; ``*_user`` recompute the same per-target values from the trained model's
masked full-sort scores (rank = 1 + candidates scoring >= the target, fedmeta's pessimistic
ties) and average them per user. Where no candidate ties a target the two per-row means must
agree, and the runner fails if they do not (a wrong mapping would show there).

Shims, all needed by RecBole 1.2.1 under numpy 2 / torch 2.13: numpy-2 removed
``np.float_``/``np.complex_``/``np.unicode_`` that ``Config.compatibility_settings`` reads;
torch >= 2.6 loads checkpoints ``weights_only`` by default, which RecBole's own best-model
file (it pickles its config) cannot pass, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set for
this process (the file is the one this run just wrote). ``recbole.quick_start`` (the only
importer of ray) is not imported, so ray needs no stand-in here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402

for _alias, _real in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, _alias):
        setattr(np, _alias, _real)

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402

K = 10
POPULATIONS = ("warm", "cold", "new-client")


class BudgetExceeded(Exception):
    """The wall-clock budget ran out between two epochs (the best checkpoint is kept)."""


class ExcludingLoader(FullSortEvalDataLoader):
    """RecBole's full-sort loader plus, per row, the items that must not compete.

    ``exclude[j]`` holds RecBole item ids for row ``j`` of ``dataset.inter_feat``; they go
    to the trainer as ``(row, item)`` pairs, which ``_full_sort_batch_eval`` sets to -inf."""

    def __init__(self, config, dataset, exclude: list[np.ndarray]):
        if len(exclude) != len(dataset):
            raise ValueError(f"{len(exclude)} exclusion lists for {len(dataset)} rows")
        self.exclude = exclude
        super().__init__(config, dataset, None, shuffle=False)

    def collate_fn(self, index):
        interaction, _, pos_u, pos_i = super().collate_fn(index)
        rows = np.asarray(index)
        lists = [torch.as_tensor(self.exclude[j], dtype=torch.long) for j in rows]
        hist_u = torch.cat([torch.full((len(x),), r, dtype=torch.long)
                            for r, x in enumerate(lists)])
        return interaction, (hist_u, torch.cat(lists)), pos_u, pos_i


def recbole_config(dataset_dir: Path, seed: int, epochs: int, stopping_step: int,
                   max_len: int, checkpoint_dir: str) -> Config:
    name = dataset_dir.name
    sys.argv = sys.argv[:1]    # RecBole's Config also reads ``--key=value`` from the command line
    return Config(model="SASRec", dataset=name, config_dict={
        "data_path": str(dataset_dir.parent),
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "alias_of_item_id": ["item_id_list"],   # one id space for history and target items
        "MAX_ITEM_LIST_LENGTH": max_len,
        "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["NDCG", "Hit"], "topk": [K], "valid_metric": f"NDCG@{K}",
        "metric_decimal_place": 10,
        "epochs": epochs, "stopping_step": stopping_step, "eval_step": 1,
        "seed": seed, "reproducibility": True,
        "use_gpu": False, "device": "cpu", "worker": 0, "show_progress": False,
        "checkpoint_dir": checkpoint_dir, "save_dataset": False, "save_dataloaders": False,
    })


def tokens(ds, field: str, ids) -> list[str]:
    return [str(t) for t in ds.id2token(field, np.asarray(ids))]


def test_exclusions(ds, manifest: dict) -> tuple[list[np.ndarray], list[str]]:
    """Per test row: fedmeta's excluded items (support + other targets) as RecBole ids, and
    the row's user token; fails unless the rows are exactly the manifest's targets."""
    users = tokens(ds, "user_id", ds.inter_feat["user_id"].numpy())
    targets = tokens(ds, "item_id", ds.inter_feat["item_id"].numpy())
    by_user = {e["token"]: e for e in manifest["evaluated"]}
    expected = sorted((e["token"], str(t)) for e in manifest["evaluated"] for t in e["targets"])
    if sorted(zip(users, targets)) != expected:
        raise SystemExit(f"{manifest['dataset']}: RecBole's test rows are not the manifest's "
                         "(user, target) pairs")
    out = []
    for u, t in zip(users, targets):
        e = by_user[u]
        items = {str(i) for i in e["seen"]} | {str(i) for i in e["targets"]}
        items.discard(t)
        out.append(np.asarray(ds.token2id("item_id", sorted(items)), dtype=np.int64).reshape(-1))
    return out, users


def history_exclusions(ds) -> list[np.ndarray]:
    """Validation rows mask their own history (the user's training items), as fedmeta would."""
    lists = ds.inter_feat["item_id_list"].numpy()
    lengths = ds.inter_feat["item_length"].numpy()
    return [lists[j, : lengths[j]].astype(np.int64) for j in range(len(ds))]


def own_scores(trainer, loader) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row NDCG@K and HR@K from the masked full-sort scores; rows with tied candidates."""
    ndcg, hit, ties = [], [], 0
    trainer.model.eval()
    with torch.no_grad():
        for batch in loader:
            _, scores, pos_u, pos_i = trainer._full_sort_batch_eval(batch)
            target = scores[pos_u, pos_i].unsqueeze(1)
            geq = (scores >= target).sum(1) - 1          # candidates other than the target
            ties += int(((scores == target).sum(1) > 1).sum())
            rank = (1 + geq).double()
            inside = rank <= K
            ndcg.append(torch.where(inside, 1.0 / torch.log2(rank + 1), torch.zeros_like(rank)))
            hit.append(inside.double())
    return torch.cat(ndcg).numpy(), torch.cat(hit).numpy(), ties


def user_mean(values: np.ndarray, owners: list[str]) -> float:
    per: dict[str, list[float]] = {}
    for v, u in zip(values, owners):
        per.setdefault(u, []).append(float(v))
    return float(np.mean([np.mean(v) for v in per.values()])) if per else float("nan")


def score_population(trainer, config, ds, rows: np.ndarray, exclude, owners) -> dict:
    sub = ds.copy(ds.inter_feat[torch.as_tensor(rows, dtype=torch.long)])
    masked = ExcludingLoader(config, sub, [exclude[j] for j in rows])
    res = trainer.evaluate(masked, load_best_model=False)
    stock = trainer.evaluate(FullSortEvalDataLoader(config, sub, None, shuffle=False),
                             load_best_model=False)
    nd, hr, ties = own_scores(trainer, masked)
    who = [owners[j] for j in rows]
    out = {"ndcg@10": float(res[f"ndcg@{K}"]), "hr@10": float(res[f"hit@{K}"]),
           "ndcg@10_user": user_mean(nd, who), "hr@10_user": user_mean(hr, who),
           "ndcg@10_row_own": float(nd.mean()), "ndcg@10_stock": float(stock[f"ndcg@{K}"]),
           "hr@10_stock": float(stock[f"hit@{K}"]), "users": len(set(who)),
           "targets": int(len(rows)), "tied_rows": ties}
    if ties == 0 and abs(out["ndcg@10"] - out["ndcg@10_row_own"]) > 1e-6:
        raise SystemExit(f"RecBole's evaluator ({out['ndcg@10']}) and the recomputed per-row "
                         f"NDCG@10 ({out['ndcg@10_row_own']}) disagree without ties")
    return out


def run(dataset_dir: Path, seed: int, epochs: int, stopping_step: int, budget_s: float) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="recbole-ckpt-") as ckpt:
        config = recbole_config(dataset_dir, seed, epochs, stopping_step, manifest["max_len"],
                                ckpt)
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        if dataset.item_num != manifest["n_items"] + 1:   # + RecBole's padding id 0
            raise SystemExit(f"{dataset_dir}: RecBole knows {dataset.item_num - 1} items, the "
                             f"catalogue has {manifest['n_items']}")
        train_data, valid_data, test_data = data_preparation(config, dataset)
        valid = ExcludingLoader(config, valid_data._dataset,
                                history_exclusions(valid_data._dataset))
        model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        seen = {"epochs": 0, "best_epoch": None}
        deadline = t0 + budget_s

        def after_epoch(epoch_idx, valid_score):
            seen["epochs"] = epoch_idx + 1
            if trainer.cur_step == 0:
                seen["best_epoch"] = epoch_idx + 1
            if time.perf_counter() > deadline and epoch_idx + 1 < epochs:
                raise BudgetExceeded

        t_fit = time.perf_counter()
        stop = "cap"
        try:
            best, _ = trainer.fit(train_data, valid, saved=True, show_progress=False,
                                  callback_fn=after_epoch)
            if seen["epochs"] < epochs:
                stop = "early"
        except BudgetExceeded:
            stop = "budget"
        fit_s = time.perf_counter() - t_fit
        ds = test_data._dataset
        exclude, owners = test_exclusions(ds, manifest)
        # load the best epoch's weights once (RecBole's own reload), then score populations
        overall = trainer.evaluate(ExcludingLoader(config, ds, exclude), load_best_model=True)
        pops = {}
        populations = {t: manifest["users"][t].get("population") for t in set(owners)}
        for p in POPULATIONS:
            rows = np.flatnonzero([populations[u] == p for u in owners])
            if len(rows):
                pops[p] = score_population(trainer, config, ds, rows, exclude, owners)
    return {"dataset": manifest["dataset"], "domain": manifest["domain"], "seed": seed,
            "epochs_run": seen["epochs"], "best_epoch": seen["best_epoch"],
            "epochs_cap": epochs, "stopping_step": stopping_step, "stop": stop,
            "stopped_early": stop == "early", "best_valid_ndcg@10": float(trainer.best_valid_score),
            "overall": {k: float(v) for k, v in overall.items()}, "populations": pops,
            "rows": manifest["rows"], "fit_s": fit_s, "wall_s": time.perf_counter() - t0,
            "versions": {"recbole": __import__("recbole").__version__,
                         "torch": torch.__version__, "numpy": np.__version__,
                         "pandas": __import__("pandas").__version__},
            "config": {k: config[k] for k in ("n_layers", "n_heads", "hidden_size", "inner_size",
                                              "hidden_dropout_prob", "attn_dropout_prob",
                                              "learning_rate", "train_batch_size",
                                              "MAX_ITEM_LIST_LENGTH", "loss_type")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--stopping-step", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=3600.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    res = run(a.dataset_dir, a.seed, a.epochs, a.stopping_step, a.budget_s)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
