"""Algorithm skeleton: one place for the client's inner loop, one for the server step.

A round, from the client's side: starting from the global meta-parameters, take
``local_steps`` outer steps; each step samples users (tasks), asks the algorithm for one
update direction per user (:meth:`Algorithm.user_updates` -- the only method a new
algorithm must write), combines them through a :class:`Step` (a plain mean, or clipping and
noise under DP: privacy wraps the step, algorithms never see it), and moves by ``local_lr``.
The client sends ``global - local``, a pseudo-gradient; its private parameters (a per-client
item table, when the model has one) are trained by the same steps and kept, never sent. The
server averages pseudo-gradients weighted by number of tasks and applies its optimiser (SGD
with rate beta = FedAvg/FedOpt; Adam = FedAdam).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedmeta.algorithms.objective import Objective, Params
from fedmeta.config import AlgorithmConfig
from fedmeta.data.tasks import ClientTasks


@dataclass
class ClientUpdate:
    delta: Params                  # global - local: a descent direction for the server
    num_tasks: int
    metrics: dict[str, float] = field(default_factory=dict)
    private: Params = field(default_factory=dict)   # stays on the client


class Step:
    """Turns per-user update directions into one step direction (the seam DP wraps)."""

    #: whether the client measures its training loss: a private step's loss never leaves
    #: the node, so it is not computed (an extra forward pass per step)
    reports_loss = True

    def sample(self, n_users: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        k = min(batch_size, n_users)
        return torch.randperm(n_users, generator=gen)[:k]

    def direction(self, algorithm: "Algorithm", params: Params, batch) -> Params:
        return algorithm.mean_update(params, batch)

    def affordable(self, steps: int) -> bool:
        """Whether ``steps`` more steps fit the client's budget (always, without DP)."""
        return True

    def after_round(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}


class Algorithm:
    name = "base"
    Config = AlgorithmConfig        # the algorithm's config schema (a subclass adds its keys)

    def __init__(self, cfg: AlgorithmConfig, objective: Objective):
        self.cfg, self.objective = cfg, objective

    # ---- client side: the inner loop lives in user_updates -------------------------------
    def user_updates(self, params: Params, batch) -> Params:
        """Per-user update directions, each tensor with a leading user dimension."""
        raise NotImplementedError

    def directions(self, params: Params, batch) -> Params:
        """:meth:`user_updates` computed on the token-table rows the batch reads (the same
        numbers, much less work per user: see :meth:`Objective.compact`)."""
        cut = self.objective.compact(params, batch)
        return self.objective.expand(self.user_updates(cut.params, cut.batch), cut.rows, params)

    def mean_update(self, params: Params, batch) -> Params:
        """Average direction; subclasses may override with a cheaper batched computation."""
        per_user = self.directions(params, batch)
        return {k: v.mean(0) for k, v in per_user.items()}

    def client_update(self, params: Params, tasks: ClientTasks, gen: torch.Generator,
                      step: Step | None = None, device: torch.device | None = None,
                      private: Params | None = None) -> ClientUpdate:
        """``params``: the global meta-parameters; ``private``: this client's own tensors.

        Both move together (one step, one clip under DP); only ``params`` go into the delta.
        """
        step = step or Step()
        device = device or next(iter(params.values())).device
        private = private or {}
        if set(private) & set(params):
            raise ValueError(f"private tensors {sorted(set(private) & set(params))[:3]} are also "
                             "meta-parameters")
        local = {k: torch.nn.Parameter(v.detach().clone())
                 for k, v in {**params, **private}.items()}
        opt = local_optimizer(self.cfg, list(local.values()))
        losses = []
        for i in range(self.cfg.local_steps):
            idx = step.sample(len(tasks.train), self.cfg.users_per_step, gen)
            batch = Objective.batch(tasks.train.subset(idx), tasks.catalog, self.cfg.negatives,
                                    gen, device)
            # the metric is the first batch's query loss at the global parameters: one
            # gradient-free forward per round (one per step cost a third of a FedAvg round)
            if i == 0 and len(idx) and step.reports_loss:
                with torch.no_grad():
                    detached = {k: v.detach() for k, v in local.items()}
                    losses.append(float(self.objective.batch_loss(detached, batch, "query").mean()))
            direction = step.direction(self, {k: v.detach() for k, v in local.items()}, batch)
            for k, p in local.items():
                p.grad = direction[k]
            opt.step()
        delta = {k: params[k] - local[k].detach() for k in params}
        metrics = {"train_query_loss": sum(losses) / len(losses) if losses else float("nan")}
        metrics.update(step.after_round())
        return ClientUpdate(delta, tasks.num_tasks, metrics,
                            {k: local[k].detach().clone() for k in private})

    # ---- evaluation-time adaptation (shared by every algorithm) --------------------------
    def adapt_users(self, params: Params, batch, steps: int) -> Params:
        """Per-user adapted parameters after ``steps`` inner steps on each user's support."""
        def one(p, user):
            return self.objective.adapt(p, user, steps, self.cfg.inner_lr, "support")
        return self.objective.per_user(one, params, batch)


def local_optimizer(cfg: AlgorithmConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The client's outer optimiser; it only ever sees the (possibly privatised) direction."""
    if cfg.local_optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.local_lr)
    return torch.optim.SGD(params, lr=cfg.local_lr)


class ServerOptimizer:
    """Applies the aggregated pseudo-gradient with torch's SGD or Adam (FedOpt)."""

    def __init__(self, params: Params, kind: str, lr: float):
        self.params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
        plist = list(self.params.values())
        self.opt = (torch.optim.SGD(plist, lr=lr) if kind == "sgd"
                    else torch.optim.Adam(plist, lr=lr, betas=(0.9, 0.99), eps=1e-8))

    def step(self, updates: list[ClientUpdate]) -> Params:
        total = sum(u.num_tasks for u in updates)
        if total <= 0:
            raise ValueError("no client update carries any task: nothing to aggregate")
        for name, p in self.params.items():
            p.grad = sum(u.delta[name].to(p.device) * (u.num_tasks / total) for u in updates)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.current()

    def current(self) -> Params:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, params: Params, state: dict) -> None:
        with torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(v)
        self.opt.load_state_dict(state)
