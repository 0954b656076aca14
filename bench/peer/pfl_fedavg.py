"""fedmeta's FedAvg workload run by the peer simulator, pfl 0.6 (runs inside the peer's venv).

``python -m bench.peer.pfl_fedavg WORKLOAD THREADS`` (repo root on PYTHONPATH) prints one JSON
line: per-central-iteration wall seconds, set-up time, final evaluation. What is whose:

- pfl's: the loop (``FederatedAveraging.run`` on a ``SimulatedBackend``), cohort sampling
  (``FederatedDataset`` with the minimize-reuse sampler, cohort = every training client),
  local training (``PyTorchModel``'s SGD bridge: ``loss().backward()`` then the optimiser),
  weighting (``WeightByDatapoints``: tasks per client, like fedmeta's task-weighted mean)
  and central DP (``CentrallyAppliedPrivacyMechanism(GaussianMechanism)``: clip each client's
  update to C, add N(0, (sigma C)^2) to the sum; FedAvg's average then divides by the cohort,
  as Flower's server-side fixed clipping does; uniform weights under DP, as in fedmeta).
- fedmeta's: the users (pickled tasks, :mod:`bench.peer.workload`), the model
  (``build_model``), the loss (``Objective.batch_loss`` on all target positions, FedAvg's
  objective), the batches (``Objective.batch``: users drawn without replacement per step,
  fresh negatives) and the evaluation (``evaluate_client`` on every client, at the last
  iteration, as fedmeta evaluates after its last round).

Device: the workload's ``runtime.device`` (the bench device), for the batches and the
evaluation; the bench starts this runner with ``PFL_PYTORCH_DEVICE`` set to the same device,
which is where pfl 0.6 keeps its model's tensors.

One adaptation: pfl evaluates every training user before and after local training on its
evaluation iterations (always including the first). fedmeta has no such pass, so the
contexts are cleared of it; evaluation is the shared protocol only.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()   # before the heavy imports: start-up is part of the figure

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from importlib.metadata import version  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism  # noqa: E402

from bench.peer.workload import catalogues, describe, load, shared_config  # noqa: E402
from fedmeta.algorithms import Objective, build_algorithm  # noqa: E402
from fedmeta.eval.protocol import evaluate_client  # noqa: E402
from fedmeta.model.recommender import build_model, shared_item_rows  # noqa: E402

PREFIX = "net."


def workload_device(name: str) -> torch.device:
    """fedmeta's ``runtime.device`` as fedmeta resolves it (``auto``: a GPU when visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Recommender(torch.nn.Module):
    """fedmeta's recommender with the ``loss``/``metrics`` pair pfl's PyTorchModel calls."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.objective = Objective(net)

    def loss(self, **batch):
        params = dict(self.net.named_parameters())
        targets = {**batch, "all": batch["support"] | batch["query"]}
        return self.objective.batch_loss(params, targets, "all").mean()

    def metrics(self, **batch):   # never called: training-user evaluation is switched off
        return {"users": Weighted.from_unweighted(len(batch["seq"]))}


class ClientData(Dataset):
    """One fedmeta client. ``iter`` yields ``local_steps`` batches of ``users_per_step`` users,
    drawn like fedmeta's ``Step.sample`` (a fresh permutation per step) with fresh negatives;
    ``len`` is the number of training tasks, which ``WeightByDatapoints`` weighs by."""

    def __init__(self, client, objective: Objective, steps: int, negatives: int, seed: int,
                 device: torch.device):
        super().__init__(raw_data=(client.train.inputs,), user_id=client.client_id)
        self.client, self.steps, self.negatives, self.device = client, steps, negatives, device
        self.gen = torch.Generator().manual_seed(seed)
        # the batches the model's loss expects (whole catalogue or sampled negatives), as
        # fedmeta's clients build them; older objectives had one kind only
        self.make = getattr(objective, "batch_for", Objective.batch)

    def __len__(self):
        return len(self.client.train)

    def iter(self, batch_size):  # noqa: A003 (pfl's name)
        n = len(self.client.train)
        for _ in range(self.steps):
            idx = torch.randperm(n, generator=self.gen)[:min(batch_size, n)]
            yield self.make(self.client.train.subset(idx), self.client.catalog, self.negatives,
                            self.gen, self.device)


class FedAvgNoTrainEval(FederatedAveraging):
    def get_next_central_contexts(self, *args, **kwargs):
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class FinalEvaluation(TrainingProcessCallback):
    """fedmeta's evaluation protocol on every client after the last central iteration."""

    def __init__(self, cfg, clients, algorithm, last: int, device: torch.device):
        self.cfg, self.clients, self.algorithm, self.last = cfg, clients, algorithm, last
        self.device = device
        self.rows: list[dict] = []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        if central_iteration == self.last:
            params = {k[len(PREFIX):]: v.detach() for k, v in model.variable_map.items()}
            for c in self.clients:
                seed = zlib.crc32(f"{self.cfg.seed}/{c.client_id}/eval".encode())
                self.rows += evaluate_client(self.algorithm, params, c,
                                             self.cfg.algorithm.eval_steps, seed,
                                             self.device)
        return False, Metrics()


class RoundClock(TrainingProcessCallback):
    """Wall seconds per central iteration, end to end (last callback, so it includes eval)."""

    def __init__(self, device: torch.device):
        self.rounds: list[dict] = []
        self.t = None
        self.device = device

    def now(self) -> float:
        """The clock, after queued GPU work is done (fedmeta's timers wait for it too)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, *, model):
        self.t = self.now()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = self.now()
        self.rounds.append({"round": central_iteration + 1, "seconds": now - self.t})
        self.t = now
        return False, Metrics()


def final_metrics(rows: list[dict]) -> dict:
    """User-weighted mean per domain/population/stage/metric, fedmeta's summary layout."""
    users = {(r["client"], r["population"], r["stage"]): r["value"] for r in rows
             if r["metric"] == "users"}
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if r["metric"] == "users":
            continue
        w = users.get((r["client"], r["population"], r["stage"]), 0.0)
        key = (r["domain"], r["population"], r["stage"], r["metric"])
        s = acc.setdefault(key, [0.0, 0.0])
        s[0] += r["value"] * w
        s[1] += w
    out: dict = {}
    for (dom, pop, stage, metric), (num, den) in acc.items():
        out.setdefault(dom, {}).setdefault(pop, {}).setdefault(stage, {})[metric] = (
            num / den if den else float("nan"))
    return out


def main(argv: list[str]) -> int:
    path, threads = argv[0], int(argv[1])
    torch.set_num_threads(threads)
    cfg, clients = load(path)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    a = cfg.algorithm
    device = workload_device(cfg.runtime.device)
    training = [c for c in clients if not c.partition.new_client and len(c.train)]
    net = build_model(cfg.model, cfg.data.max_len, seed=cfg.seed,
                      item_rows=shared_item_rows(cfg.model, catalogues(clients)))
    net.to(device).train()
    module = Recommender(net)
    datasets = {c.client_id: ClientData(c, module.objective, a.local_steps, a.negatives,
                                        zlib.crc32(f"peer/{cfg.seed}/{c.client_id}".encode()),
                                        device)
                for c in training}
    ids = [c.client_id for c in training]
    federated = FederatedDataset(lambda uid: datasets[uid], get_user_sampler("minimize_reuse", ids))
    trainable = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(module, local_optimizer_create=torch.optim.Adam,
                         central_optimizer=torch.optim.SGD(trainable, lr=a.server_lr))
    central = cfg.privacy.central
    post = ([CentrallyAppliedPrivacyMechanism(GaussianMechanism(central.clipping_norm,
                                                                 central.noise_multiplier))]
            if central.enabled else [WeightByDatapoints()])
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=post)
    rounds = cfg.runtime.rounds
    evaluation = FinalEvaluation(cfg, clients, build_algorithm(a, Objective(net)), rounds - 1,
                                 device)
    clock = RoundClock(device)
    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds,
                               train_cohort_size=len(training), val_cohort_size=0)
    train = NNTrainHyperParams(local_learning_rate=a.local_lr, local_num_epochs=None,
                               local_batch_size=a.users_per_step, local_num_steps=a.local_steps)
    setup = time.perf_counter() - T_START
    with contextlib.redirect_stdout(sys.stderr):   # pfl prints its metrics every iteration
        FedAvgNoTrainEval().run(algorithm_params=params, backend=backend, model=model,
                                model_train_params=train,
                                model_eval_params=NNEvalHyperParams(local_batch_size=None),
                                callbacks=[evaluation, clock])
    out = {"rounds": clock.rounds, "setup_s": setup, "wall_s": time.perf_counter() - T_START,
           "final_metrics": final_metrics(evaluation.rows), "threads": threads,
           "cohort": len(training), "sizes": describe(clients), "config": shared_config(cfg),
           "central_dp": ({"noise_multiplier": central.noise_multiplier,
                           "clipping_norm": central.clipping_norm} if central.enabled else None),
           "params": sum(p.numel() for p in trainable), "device": str(device),
           "versions": {"pfl": version("pfl"), "torch": torch.__version__}}
    sys.stdout.write(json.dumps(out, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
