"""The per-user training objective, written functionally so ``torch.func`` can vmap it.

Every algorithm is expressed through three functions of ``(params, user)`` where ``user`` is
one user's row of a batch (no leading batch dimension): the loss on a target mask, an inner
loop of plain gradient steps, and full-catalogue scores. ``vmap`` over users then gives
per-user quantities (adapted parameters, meta-gradients) without Python loops, and per-user
quantities are exactly what user-level DP needs to clip.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from fedmeta.data.tasks import Catalog, TaskTensors

Params = dict[str, torch.Tensor]


class Objective:
    """Sampled-softmax next-item loss of the shared recommender."""

    def __init__(self, model: torch.nn.Module, chunk_size: int | None = None):
        self.model = model
        self.chunk_size = chunk_size

    # ---- batches -------------------------------------------------------------------------
    @staticmethod
    def batch(tasks: TaskTensors, catalog: Catalog, negatives: int, gen: torch.Generator,
              device: torch.device) -> dict[str, torch.Tensor]:
        """Gather features for a set of users; negatives are drawn per user, outside vmap."""
        n_users = len(tasks)
        neg = torch.randint(0, catalog.n_items, (n_users, negatives), generator=gen)
        feats = catalog.feats
        out = {
            "seq": feats[tasks.inputs],
            "attn": (tasks.inputs != catalog.pad).long(),
            "cand": feats[torch.cat([tasks.targets, neg], dim=1)],
            "targets": tasks.targets,
            "neg": neg,
            "support": tasks.support,
            "query": tasks.query,
            "pos": tasks.eval_pos,
        }
        return {k: v.to(device) for k, v in out.items()}

    # ---- per-user functions (no batch dimension) -----------------------------------------
    def loss(self, params: Params, user: dict[str, torch.Tensor], mask: str) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in user.items()}
        return self.batch_loss(params, one, mask)[0]

    def batch_loss(self, params: Params, batch: dict[str, torch.Tensor], mask: str) -> torch.Tensor:
        """Per-user mean negative log-likelihood over the positions in ``mask``: shape (B,)."""
        hidden, cand = functional_call(self.model, params,
                                       (batch["seq"], batch["attn"], batch["cand"]))
        return self.nll(hidden, cand, batch, mask)

    @staticmethod
    def nll(hidden, cand, batch, mask: str) -> torch.Tensor:
        length = hidden.shape[1]
        pos_vec, neg_vec = cand[:, :length], cand[:, length:]
        pos = (hidden * pos_vec).sum(-1)                                   # (B, L)
        neg = torch.einsum("bld,bnd->bln", hidden, neg_vec)                # (B, L, N)
        clash = batch["targets"].unsqueeze(-1) == batch["neg"].unsqueeze(1)
        neg = neg.masked_fill(clash, float("-inf"))
        nll = torch.logsumexp(torch.cat([pos.unsqueeze(-1), neg], -1), -1) - pos
        m = batch[mask].to(nll.dtype)
        return (nll * m).sum(-1) / m.sum(-1).clamp(min=1.0)

    def adapt(self, params: Params, user, steps: int, lr: float, mask: str = "support") -> Params:
        """Inner loop: ``steps`` plain SGD steps on one user's ``mask`` loss.

        Differentiable: under an outer ``grad`` this is second-order MAML.
        """
        for _ in range(steps):
            g = grad(self.loss)(params, user, mask)
            params = {k: params[k] - lr * g[k] for k in params}
        return params

    def scores(self, params: Params, user, all_feats: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item for one user, from the hidden state at ``pos``."""
        one = {k: v.unsqueeze(0) for k, v in user.items()}
        hidden, _ = functional_call(self.model, params, (one["seq"], one["attn"], one["cand"][:, :0]))
        return self._items(params, all_feats) @ hidden[0, user["pos"]]

    def _items(self, params: Params, feats: torch.Tensor) -> torch.Tensor:
        sub = {k[len("items."):]: v for k, v in params.items() if k.startswith("items.")}
        return functional_call(self.model.items, sub, (feats,))

    # ---- vmapped helpers -----------------------------------------------------------------
    def per_user(self, fn: Callable, params: Params, batch: dict[str, torch.Tensor]):
        """vmap ``fn(params, user)`` over the users of ``batch`` (params shared)."""
        return vmap(fn, in_dims=(None, 0), randomness="different",
                    chunk_size=self.chunk_size)(params, batch)

    def per_user_params(self, fn: Callable, params: Params, batch: dict[str, torch.Tensor]):
        """vmap ``fn(params_u, user)`` where each user has its own parameters (leading dim)."""
        return vmap(fn, in_dims=(0, 0), randomness="different",
                    chunk_size=self.chunk_size)(params, batch)
