"""The per-user training objective, written functionally so ``torch.func`` can vmap it.

Every algorithm is expressed through three functions of ``(params, user)`` where ``user`` is
one user's row of a batch (no leading batch dimension): the loss on a target mask, an inner
loop of plain gradient steps, and full-catalogue scores. ``vmap`` over users then gives
per-user quantities (adapted parameters, meta-gradients) without Python loops, and per-user
quantities are exactly what user-level DP needs to clip.

The loss is next-item cross-entropy. Over the whole domain catalogue where that fits (every
item competes with the target, as in SASRec with cross-entropy): a few dozen uniform
negatives make the task so easy that the ranking over the whole catalogue, which evaluation
uses, is barely trained. It fits when the catalogue has at most
``max(FULL_SOFTMAX_MAX_ITEMS, negatives)`` items: scoring it then costs no more than the
budget (per-user memory and time grow with the candidates scored: second-order MAML on the
tiny model needs about 3.4 GB and 40 s per 32-user step at 4,096 candidates on one CPU
thread, against 1.3 GB and 7 s at 600). Larger catalogues fall back to a sampled softmax whose negatives' logits are corrected by ``log(N q(item))`` (the
log-Q correction): the sum over N draws from q then estimates the full softmax's
normaliser, so the sampled loss trains towards the same model. Each user's candidates are
their own (drawn per user, outside vmap) and the whole catalogue is the same for everyone,
so one user's loss never depends on another user's data, which user-level DP relies on.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch.func import functional_call, grad, vmap

from fedmeta.data.tasks import Catalog, TaskTensors

Params = dict[str, torch.Tensor]

TOKEN_TABLE = "items.tokens.weight"

#: catalogues up to this size (or up to ``negatives``) are scored whole by the training loss
FULL_SOFTMAX_MAX_ITEMS = 2048
LOSSES = ("full", "sampled")


class Cut(NamedTuple):
    """What :meth:`Objective.compact` returns; ``rows`` is None when nothing was cut."""
    params: Params
    batch: dict[str, torch.Tensor]
    rows: torch.Tensor | None
    catalog: torch.Tensor | None


class Objective:
    """Next-item cross-entropy of the shared recommender (full or sampled softmax)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.loss_kind = getattr(model, "loss_kind", "full")   # set by build_model
        if self.loss_kind not in LOSSES:
            raise ValueError(f"model.loss_kind: {self.loss_kind!r} is not one of {list(LOSSES)}")

    # ---- batches -------------------------------------------------------------------------
    @staticmethod
    def batch(tasks: TaskTensors, catalog: Catalog, negatives: int, gen: torch.Generator,
              device: torch.device, *, loss: str = "full",
              proposal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Gather features for a set of users.

        ``loss="full"``: when the catalogue has at most ``max(FULL_SOFTMAX_MAX_ITEMS,
        negatives)`` items, ``cand`` is the whole catalogue (one expanded view, not a copy per user) and targets
        index into it; otherwise, and always with ``loss="sampled"``, ``cand`` holds each
        user's targets and then ``negatives`` items drawn per user (outside vmap) from
        ``proposal`` (probabilities over the catalogue; uniform when None), with ``logq`` =
        log(negatives * q(item)) to subtract from their logits. A proposal must not be
        computed from the client's users under DP (e.g. their own popularity): a user's
        gradient would then depend on the others'.
        """
        if loss not in LOSSES:
            raise ValueError(f"loss: {loss!r} is not one of {list(LOSSES)}")
        n_users, n_items, feats = len(tasks), catalog.n_items, catalog.feats
        out = {
            "seq": feats[tasks.inputs],
            "attn": (tasks.inputs != catalog.pad).long(),
            "targets": tasks.targets,
            "support": tasks.support,
            "query": tasks.query,
            "pos": tasks.eval_pos,
        }
        if loss == "full" and n_items <= max(FULL_SOFTMAX_MAX_ITEMS, negatives):
            out = {k: v.to(device) for k, v in out.items()}
            whole = feats[:n_items].to(device)
            out["cand"] = whole.unsqueeze(0).expand(n_users, *whole.shape)
            return out
        if negatives < 1:
            raise ValueError(f"negatives: the sampled loss needs >= 1, got {negatives}")
        if proposal is None:
            neg = torch.randint(0, n_items, (n_users, negatives), generator=gen)
            logq = torch.full((n_users, negatives), math.log(negatives / n_items))
        else:
            q = torch.as_tensor(proposal, dtype=torch.float64).cpu()
            if q.shape != (n_items,) or bool((q < 0).any()) or not float(q.sum()) > 0:
                raise ValueError(f"proposal: expected {n_items} non-negative weights, not all "
                                 f"zero, got shape {tuple(q.shape)}")
            q = q / q.sum()
            neg = torch.multinomial(q, n_users * negatives, replacement=True,
                                    generator=gen).view(n_users, negatives)
            logq = torch.log(negatives * q[neg]).float()
        out.update(cand=feats[torch.cat([tasks.targets, neg], dim=1)], neg=neg, logq=logq)
        return {k: v.to(device) for k, v in out.items()}

    def batch_for(self, tasks: TaskTensors, catalog: Catalog, negatives: int,
                  gen: torch.Generator, device: torch.device,
                  proposal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`batch` with the loss the model was built for (``model.loss``)."""
        return self.batch(tasks, catalog, negatives, gen, device, loss=self.loss_kind,
                          proposal=proposal)

    # ---- per-user functions (no batch dimension) -----------------------------------------
    def loss(self, params: Params, user: dict[str, torch.Tensor], mask: str) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in user.items()}
        return self.batch_loss(params, one, mask)[0]

    def batch_loss(self, params: Params, batch: dict[str, torch.Tensor], mask: str) -> torch.Tensor:
        """Per-user mean negative log-likelihood over the positions in ``mask``: shape (B,)."""
        if self.loss_kind == "sampled" and "neg" not in batch:
            raise ValueError("model.loss='sampled' but this batch scores the whole catalogue: "
                             "build batches with Objective(model).batch_for(...), which "
                             "follows the model's loss, not the class-level Objective.batch")
        hidden, cand = functional_call(self.model, params,
                                       (batch["seq"], batch["attn"], batch["cand"]))
        return self.nll(hidden, cand, batch, mask)

    @staticmethod
    def nll(hidden, cand, batch, mask: str) -> torch.Tensor:
        """Cross-entropy of each target position, averaged over ``mask`` per user: (B,).

        Full batches (no ``neg``): logits over the whole catalogue. Sampled batches: the
        target against its user's negatives, log-Q corrected, a negative equal to the
        target at that position left out (an accidental hit is not a rival)."""
        if "neg" in batch:
            length = hidden.shape[1]
            pos_vec, neg_vec = cand[:, :length], cand[:, length:]
            pos = (hidden * pos_vec).sum(-1)                                   # (B, L)
            neg = torch.einsum("bld,bnd->bln", hidden, neg_vec)                # (B, L, N)
            neg = neg - batch["logq"].unsqueeze(1).to(neg.dtype)
            clash = batch["targets"].unsqueeze(-1) == batch["neg"].unsqueeze(1)
            neg = neg.masked_fill(clash, float("-inf"))
            nll = torch.logsumexp(torch.cat([pos.unsqueeze(-1), neg], -1), -1) - pos
        else:
            logits = torch.einsum("bld,bnd->bln", hidden, cand)               # (B, L, items)
            # padded positions hold the PAD index (one past the catalogue): any row will do,
            # the mask drops them
            target = batch["targets"].clamp(max=cand.shape[1] - 1).unsqueeze(-1)
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, target).squeeze(-1)
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
        width = batch["seq"].shape[-1] - self.model.items.id_columns
        used = [batch["seq"][..., :width].reshape(-1),
                _shared(batch["cand"])[..., :width].reshape(-1),
                torch.zeros(1, dtype=batch["seq"].dtype, device=batch["seq"].device)]
        if catalog is not None:
            used.append(catalog[..., :width].reshape(-1))
        rows = torch.unique(torch.cat(used))                     # sorted: row 0 comes first
        if len(rows) == table.shape[0]:
            return Cut(params, batch, None, catalog)

        def renumber(feats):
            one = _shared(feats)     # the whole catalogue, the same for every user: once
            ids = torch.searchsorted(rows, one[..., :width].contiguous())
            return torch.cat([ids, one[..., width:]], dim=-1).expand_as(feats)

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


def _shared(feats: torch.Tensor) -> torch.Tensor:
    """The first user's slice of a tensor expanded over users (stride 0), else the tensor."""
    if feats.dim() == 3 and feats.shape[0] > 1 and feats.stride(0) == 0:
        return feats[:1]
    return feats
