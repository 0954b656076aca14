"""User-level DP-SGD inside a client: the privacy wrapper around one local step.

The privacy unit is one user: a user's whole history is one sample, users are Poisson-
sampled at rate q each step, each user's update direction (whatever the algorithm makes of
that user: a gradient, a Reptile difference, a MAML meta-gradient) is clipped to L2 norm C
over *all* meta-parameters jointly, and Gaussian noise N(0, sigma^2 C^2) is added to the sum
before dividing by the expected batch size q*n. Clipping, noise and scaling are Opacus's
``DPOptimizer`` (on the item-token rows the batch read; the table's other rows, whose
clipped sum is zero, get their noise from Opacus's noise function); accounting is an Opacus
accountant (RDP or PRV) that persists across rounds and restarts through the client state.
Per-user directions come from ``torch.func`` (any algorithm) or, for FedAvg, from Opacus's
own hooks.

The noise multiplier, when a target epsilon is given, is solved once for the whole planned
run (``rounds * local_steps`` steps at rate q) and then kept in the state, so later rounds
never re-solve it with a different answer.
"""

from __future__ import annotations

import logging

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise

from fedmeta.algorithms.base import Algorithm, Step
from fedmeta.algorithms.objective import TOKEN_TABLE, Params
from fedmeta.config import LocalDPConfig
from fedmeta.privacy.accounting import UserLevelAccountant

log = logging.getLogger(__name__)

class PrivateStep(Step):
    """Clip, noise and (optionally) account one local step.

    ``generator`` is the only entropy the step uses (Poisson sample and noise): the node
    seeds it from the OS CSPRNG (:mod:`fedmeta.privacy.randomness`). ``accountant``: when
    given, every step is recorded in it as it is taken (planning tools, audits); a node
    passes none, because its ledger charges the whole round before the first step.
    """

    reports_loss = False     # nothing un-noised leaves a DP node: no loss is measured

    def __init__(self, dp: LocalDPConfig, n_users: int, sample_rate: float, noise_multiplier: float,
                 generator: torch.Generator, accountant: UserLevelAccountant | None = None):
        self.dp, self.n_users, self.q = dp, n_users, sample_rate
        self.sigma, self.accountant = noise_multiplier, accountant
        self.expected_batch = max(1, round(sample_rate * n_users))
        self.noise_gen = generator
        self._optimizer: DPOptimizer | None = None
        self._slots: dict[str, torch.nn.Parameter] = {}
        self.steps_taken = 0

    def _account(self) -> None:
        if self.accountant is not None:
            self.accountant.step(self.sigma, self.q, 1)
        self.steps_taken += 1

    # ---- Step interface ------------------------------------------------------------------
    def sample(self, n_users: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """Poisson sampling, each user independently with probability q, from the step's own
        secret generator (never the caller's): amplification needs a sample the server
        cannot know."""
        return torch.nonzero(torch.rand(n_users, generator=self.noise_gen) < self.q).flatten()

    def affordable(self, steps: int) -> bool:
        if self.accountant is None:
            return True
        return self.accountant.can_afford(self.sigma, self.q, steps)

    def direction(self, algorithm: Algorithm, params: Params, batch) -> Params:
        n = batch["seq"].shape[0]
        if self.dp.grad_sample_mode == "ghost":   # clips without materialising per-user gradients
            from fedmeta.privacy.ghost import ghost_direction

            direction = ghost_direction(algorithm, params, batch, self.dp.max_grad_norm, self.sigma,
                                        self.expected_batch, self.noise_gen)
            self._account()
            return direction
        rows = None
        if n == 0:
            per_user = {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}
        elif self.dp.grad_sample_mode == "hooks":
            per_user = opacus_hooks_grads(algorithm, params, batch)
        else:   # on the token rows the batch reads; privatize noises every row
            cut = algorithm.objective.compact(params, batch)
            per_user, rows = algorithm.user_updates(cut.params, cut.batch), cut.rows
        direction = self.privatize(per_user, params, rows)
        self._account()
        return direction

    def privatize(self, per_user: Params, like: Params,
                  rows: torch.Tensor | None = None) -> Params:
        """Clip each user's direction to C (jointly over all tensors), add noise, scale.

        ``rows``: the token table in ``per_user`` holds only these rows of the one in ``like``
        (the rows the batch read, see ``Objective.compact``); every user's direction is exactly
        zero on the others, so they change no norm and add nothing to the clipped sum. Opacus
        clips, sums and noises the rows given; every other row gets the noise Opacus would
        have given it (its own noise function, generator, std sigma*C and scaling), so the
        released direction has the same distribution as with the whole table, and the rows a
        batch read are not revealed by which rows moved.
        """
        missing = set(like) - set(per_user)
        if missing:
            raise RuntimeError(f"per-user directions miss trainable tensors {sorted(missing)[:5]}: "
                               "every meta-parameter must be clipped and noised")
        shapes = {k: like[k].shape for k in like}
        if rows is not None:
            shapes[TOKEN_TABLE] = torch.Size((len(rows), *like[TOKEN_TABLE].shape[1:]))
        wrong = [k for k in like if per_user[k].shape[1:] != shapes[k]]
        if wrong:
            raise RuntimeError(f"per-user directions for {wrong[:3]} have shape "
                               f"{tuple(per_user[wrong[0]].shape[1:])}, expected "
                               f"{tuple(shapes[wrong[0]])}")
        # a user whose direction is not finite everywhere contributes zero: NaN/Inf would pass
        # through clipping into the release, an un-noised signal about who was sampled. A
        # user's norm over a tensor is finite iff all its entries are (or, past ~1e19, it
        # overflows: that user is dropped too, which only lowers its influence); one norm
        # per user reads each tensor once, where an element-wise isfinite + all took 60 % of
        # a small-model clip-and-noise
        finite = None
        for name in shapes:
            t = per_user[name]
            if t.shape[0] == 0 or t.numel() == 0:     # an empty Poisson sample: nothing to check
                continue
            ok = torch.isfinite(torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1))
            finite = ok if finite is None else finite & ok
        opt = self._dp_optimizer(shapes, like)
        for name, slot in self._slots.items():
            g = per_user[name].detach().to(slot.dtype)
            if finite is not None and not bool(finite.all()):
                g = torch.where(finite.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))
            slot.grad_sample = g
        scale = opt.expected_batch_size * opt.accumulated_iterations   # what scale_grad divides by
        opt.pre_step()
        out = {name: slot.grad.detach().clone() for name, slot in self._slots.items()}
        opt.zero_grad(set_to_none=True)
        if rows is not None:
            full = _generate_noise(std=opt.noise_multiplier * opt.max_grad_norm,
                                   reference=like[TOKEN_TABLE], generator=self.noise_gen,
                                   secure_mode=opt.secure_mode)
            full = full / scale
            full[rows] = out[TOKEN_TABLE]
            out[TOKEN_TABLE] = full
        return out

    def _dp_optimizer(self, shapes: dict[str, torch.Size], like: Params) -> DPOptimizer:
        """Opacus's optimiser over one slot per tensor, rebuilt when a slot's shape changes
        (the cut token table has as many rows as the batch read)."""
        if self._optimizer is None or any(k not in self._slots or self._slots[k].shape != shapes[k]
                                          for k in shapes):
            old = self._slots if self._optimizer is not None else {}
            self._slots = {k: old[k] if k in old and old[k].shape == shapes[k]
                           else torch.nn.Parameter(like[k].new_zeros(shapes[k])) for k in shapes}
            self._optimizer = DPOptimizer(
                torch.optim.SGD(list(self._slots.values()), lr=1.0),
                noise_multiplier=self.sigma, max_grad_norm=self.dp.max_grad_norm,
                expected_batch_size=self.expected_batch, loss_reduction="mean",
                generator=self.noise_gen, secure_mode=self.dp.secure_mode)
        return self._optimizer

    def after_round(self) -> dict[str, float]:
        out = {"noise_multiplier": self.sigma, "sample_rate": self.q,
               "dp_steps": float(self.steps_taken)}
        if self.accountant is not None:
            out.update(epsilon=self.accountant.epsilon(), delta=self.accountant.delta)
        return out


def opacus_hooks_grads(algorithm: Algorithm, params: Params, batch) -> Params:
    """Per-user FedAvg gradients from Opacus's GradSampleModule hooks (one user = one sample)."""
    from opacus import GradSampleModule

    from fedmeta.algorithms.fedavg import _all_targets

    model = algorithm.objective.model
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in params.items():
            named[k].copy_(v)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        full = _all_targets(batch)
        hidden, cand = gsm(full["seq"], full["attn"], full["cand"])
        loss = algorithm.objective.nll(hidden, cand, full, "all").mean()
        loss.backward()
        out = {k: named[k].grad_sample.detach().clone() for k in params}
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()
        for module in model.modules():   # a failed pass must not leave state that rescales the next
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)
        for p in model.parameters():
            p.grad = None
    return out
