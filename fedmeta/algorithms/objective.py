"""The per-user training objective, written functionally so ``torch.func`` can vmap it.

Every algorithm is expressed through three functions of ``(params, user)`` where ``user`` is
one user's row of a batch (no leading batch dimension): the loss on a target mask, an inner
loop of plain gradient steps, and full-catalogue scores. ``vmap`` over users then gives
per-user quantities (adapted parameters, meta-gradients) without Python loops, and per-user
quantities are exactly what user-level DP needs to clip.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.func import functional_call, grad, vmap

from fedmeta.data.tasks import Catalog, TaskTensors

Params = dict[str, torch.Tensor]

TOKEN_TABLE = "items.tokens.weight"


class Cut(NamedTuple):
    """What :meth:`Objective.compact` returns; ``rows`` is None when nothing was cut."""
    params: Params
    batch: dict[str, torch.Tensor]
    rows: torch.Tensor | None
    catalog: torch.Tensor | None


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

    # ---- the token rows a batch reads ----------------------------------------------------
    def compact(self, params: Params, batch: dict[str, torch.Tensor],
                catalog: torch.Tensor | None = None) -> "Cut":
        """``params`` with the item-token table cut to the rows ``batch`` (and ``catalog``, the
        item features scored at evaluation) read, and their token ids renumbered into that cut.

        Why: per-user functions hold one copy of every parameter per user and inner step, and
        the token table is most of the parameters (78 % of tiny, 56 % of small) while a batch
        reads a few hundred of its rows. A row the batch never reads is never looked up and
        gets exactly zero gradient, first or second order, so working on the rows read gives
        the same per-user directions (:meth:`expand` puts the zeros back). Row 0 (padding)
        stays row 0, so the embedding's ``padding_idx`` keeps its meaning.
        """
        table = params.get(TOKEN_TABLE)
        if table is None:
            return Cut(params, batch, None, catalog)
        width = batch["seq"].shape[-1] - (1 if self.model.items.private is not None else 0)
        used = [batch["seq"][..., :width].reshape(-1), batch["cand"][..., :width].reshape(-1),
                torch.zeros(1, dtype=batch["seq"].dtype, device=batch["seq"].device)]
        if catalog is not None:
            used.append(catalog[..., :width].reshape(-1))
        rows = torch.unique(torch.cat(used))                     # sorted: row 0 comes first
        if len(rows) == table.shape[0]:
            return Cut(params, batch, None, catalog)

        def renumber(feats):
            ids = torch.searchsorted(rows, feats[..., :width].contiguous())
            return torch.cat([ids, feats[..., width:]], dim=-1)

        cut = {**batch, "seq": renumber(batch["seq"]), "cand": renumber(batch["cand"])}
        return Cut({**params, TOKEN_TABLE: table[rows]}, cut, rows,
                   None if catalog is None else renumber(catalog))

    @staticmethod
    def expand(per_user: Params, rows: torch.Tensor | None, params: Params) -> Params:
        """Per-user directions on the cut table back to the full table (zeros elsewhere)."""
        if rows is None or TOKEN_TABLE not in per_user:
            return per_user
        cut = per_user[TOKEN_TABLE]
        full = cut.new_zeros((cut.shape[0], *params[TOKEN_TABLE].shape))
        full[:, rows] = cut
        return {**per_user, TOKEN_TABLE: full}

    # ---- vmapped helpers -----------------------------------------------------------------
    def per_user(self, fn: Callable, params: Params, batch: dict[str, torch.Tensor]):
        """vmap ``fn(params, user)`` over the users of ``batch`` (params shared)."""
        return vmap(fn, in_dims=(None, 0), randomness="different",
                    chunk_size=self.chunk_size)(params, batch)

    def per_user_params(self, fn: Callable, params: Params, batch: dict[str, torch.Tensor]):
        """vmap ``fn(params_u, user)`` where each user has its own parameters (leading dim)."""
        return vmap(fn, in_dims=(0, 0), randomness="different",
                    chunk_size=self.chunk_size)(params, batch)
