"""Quality peer: RecBole 1.2.1's SASRec on the very per-domain split fedmeta evaluates.

``run_recbole(overrides, seeds, echo, budget_s)`` composes the experiment from the overrides
(plus ``seed=S`` per seed, so the data, partition and evaluation users are fedmeta's for that
seed), exports each domain as RecBole atomic files (:mod:`bench.peer.recbole_export`, in
this venv), trains SASRec with RecBole's own trainer to its validation early stop and scores
the test file per population (:mod:`bench.peer.recbole_sasrec`, in RecBole's venv), and
returns one row per (data, domain, population, seed).

RecBole is not a dependency of fedmeta: it runs in its own venv under ``.bench/`` (git-ignored),
made here on first use. Its pins (``ray<=2.6.3``, ``colorlog==4.7.2``, ...) do not fit
fedmeta's stack, and several of its declared dependencies (ray, thop, plotly, psutil) are
only imported by parts of RecBole this runner never touches, so it is installed with
``--no-deps`` plus exactly the packages the imported modules need. torch goes in first,
pinned to fedmeta's build, so pip does not fetch the CUDA build and both sides rank with
the same torch; numpy is pinned to fedmeta's version for the same reason. pandas is not:
RecBole 1.2.1 was written for pandas 1-2, and pandas 3 changes what it relies on without an
error (``Series.agg(len)`` measures the whole column instead of each row's sequence, which
breaks the id remapping of sequence fields and would set every history length to the row
count; ``fillna(inplace=True)`` does nothing), so its venv gets pandas 2.3.

``python -m bench.q_recbole --data synthetic|ml100k --seeds 0 1 2`` runs it alone and prints
the rows as a table and as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.common import REPO, table
from bench.peer import install

VENV = REPO / ".bench" / "recbole-venv"
METHOD = "recbole-sasrec"
RECBOLE = "recbole==1.2.1"
# what recbole.config/data/model/trainer/evaluator/utils import at module level (read from
# its sources); tensorboard because recbole.utils imports torch.utils.tensorboard
RUNTIME_DEPS = ["pandas==2.3.3", "scipy", "scikit-learn", "tqdm", "pyyaml", "colorlog==4.7.2",
                "colorama==0.4.4", "tensorboard", "texttable"]
SHARED = ("numpy",)
DATA = {"synthetic": ["data=synthetic"], "ml100k": ["data=ml100k"]}
COLS = ["method", "data", "domain", "population", "ndcg@10", "hr@10", "ndcg@10 (user mean)",
        "hr@10 (user mean)", "users", "targets", "seed", "epochs", "stopped early", "wall s"]


class RecBoleUnavailable(RuntimeError):
    """RecBole's venv could not be made, or its runner failed (the message says how)."""


def requirements() -> list[list[str]]:
    """Install steps, in order: torch alone, RecBole without its pins, its real imports."""
    try:
        torch = f"torch=={version('torch').split('+')[0]}"
        pins = [f"{name}=={version(name)}" for name in SHARED]
    except PackageNotFoundError as err:
        raise RecBoleUnavailable(f"fedmeta's venv lacks {err.name}") from err
    return [[torch], ["--no-deps", RECBOLE], [*pins, *RUNTIME_DEPS]]


def ensure_venv(venv: Path = VENV, echo=print, timeout: float = 1800) -> dict:
    """Make (or reuse) RecBole's venv; returns whether it installed and the exact commands."""
    try:
        return install.make_venv(venv, requirements(),
                                 "import recbole.data, torch.utils.tensorboard, colorlog",
                                 "recbole", echo, timeout)
    except install.PeerUnavailable as err:
        raise RecBoleUnavailable(str(err)) from None


def data_name(overrides: list[str]) -> str:
    """The ``data=`` group the overrides choose (the composed default otherwise)."""
    picked = [o.split("=", 1)[1] for o in overrides if o.startswith("data=")]
    return picked[-1] if picked else "synthetic"


def _runner(dataset_dir: Path, out: Path, seed: int, epochs: int, stopping_step: int,
            budget_s: float, log: Path) -> tuple[dict, list[str]]:
    cmd = [str(install.python(VENV)), "-m", "bench.peer.recbole_sasrec", str(dataset_dir),
           str(out), "--seed", str(seed), "--epochs", str(epochs), "--stopping-step",
           str(stopping_step), "--budget-s", f"{budget_s:.0f}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, cwd=REPO,
                                  env=env, timeout=budget_s + 900)
        except subprocess.TimeoutExpired:
            raise RecBoleUnavailable(f"the RecBole runner did not finish within "
                                     f"{budget_s + 900:.0f}s (log: {log})") from None
    if proc.returncode != 0 or not out.exists():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise RecBoleUnavailable(f"RecBole runner exited {proc.returncode}: "
                                 f"{(tail or ['no output'])[0][:300]} (log: {log})")
    return json.loads(out.read_text()), cmd


def rows_of(res: dict, data: str, wall_s: float) -> list[dict]:
    """One row per population of one domain's run."""
    out = []
    for population, m in res["populations"].items():
        out.append({"method": METHOD, "data": data, "domain": res["domain"],
                    "population": population, "ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"],
                    "ndcg@10_user": m["ndcg@10_user"], "hr@10_user": m["hr@10_user"],
                    "ndcg@10_stock": m["ndcg@10_stock"], "hr@10_stock": m["hr@10_stock"],
                    "users": m["users"], "targets": m["targets"], "seed": res["seed"],
                    "epochs": res["epochs_run"], "best_epoch": res["best_epoch"],
                    "stopped_early": res["stopped_early"], "stop": res["stop"],
                    "wall_s": wall_s})
    return out


def run_recbole(overrides: list[str], seeds: list[int], echo=print, budget_s: float = 7200.0,
                *, epochs: int = 100, stopping_step: int = 10,
                workdir: Path | None = None) -> list[dict]:
    """RecBole SASRec rows for the experiment ``overrides`` describe, one run per domain and
    seed (``seed=S`` appended, so each seed is fedmeta's own split for that seed).

    ``budget_s`` bounds the whole call: a run started late gets what is left (its trainer
    stops between epochs and is scored at its best epoch, ``stop == "budget"``); a run that
    cannot start is left out and said so through ``echo``, never estimated."""
    from bench.peer.recbole_export import export

    deadline = time.time() + budget_s
    setup = ensure_venv(echo=echo)
    echo("Q-RecBole venv " + ("installed" if setup["installed"] else "reused") + "; its commands:")
    for c in setup["commands"]:
        echo(f"  {c}")
    data = data_name(overrides)
    root = workdir or (VENV.parent / "recbole-runs")
    rows = []
    for seed in seeds:
        ovr = [*overrides, f"seed={seed}"]
        seed_dir = root / f"{data}-seed{seed}"
        exported = export(ovr, seed_dir / "data")
        for d in exported:
            left = deadline - time.time()
            if left < 60:
                echo(f"Q-RecBole {data} {d['domain']} seed {seed}: not run (time budget spent)")
                continue
            t0 = time.perf_counter()
            res, cmd = _runner(Path(d["dir"]), seed_dir / f"{d['dataset']}.json", seed, epochs,
                               stopping_step, left - 60, seed_dir / f"{d['dataset']}.log")
            wall = time.perf_counter() - t0
            got = rows_of(res, data, wall)
            rows += got
            echo(f"Q-RecBole {data} {d['domain']} seed {seed}: {res['epochs_run']} epochs "
                 f"(best {res['best_epoch']}, stop: {res['stop']}), {wall:.0f}s; "
                 + ", ".join(f"{r['population']} NDCG@10 {r['ndcg@10']:.4f}" for r in got))
            echo(f"  $ {' '.join(cmd)}")
    return rows


def render(rows: list[dict]) -> str:
    body = [[r["method"], r["data"], r["domain"], r["population"], r["ndcg@10"], r["hr@10"],
             r["ndcg@10_user"], r["hr@10_user"], r["users"], r["targets"], r["seed"],
             r["epochs"], "yes" if r["stopped_early"] else f"no ({r['stop']})", r["wall_s"]]
            for r in rows]
    return table(COLS, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.q_recbole",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(DATA), default="synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budget-min", type=float, default=120.0, help="for the whole call")
    p.add_argument("--epochs", type=int, default=100, help="epoch cap")
    p.add_argument("--stopping-step", type=int, default=10,
                   help="epochs without a better valid NDCG@10 before stopping (RecBole's)")
    p.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args(argv)
    rows = run_recbole([*DATA[a.data], *a.overrides], a.seeds, echo=print,
                       budget_s=a.budget_min * 60, epochs=a.epochs,
                       stopping_step=a.stopping_step)
    print(render(rows))
    for r in rows:
        print(json.dumps(r))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
