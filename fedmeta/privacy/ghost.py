"""User-level DP for FedAvg through Opacus ghost clipping.

Explicit per-user gradients (``torch.func`` or Opacus hooks) cost one copy of the model per
user in the batch, which is what limits the number of users per step for larger backbones.
Ghost clipping needs only per-user gradient *norms*: for ``nn.Linear`` and ``nn.Embedding``
they follow from the activations and output gradients of the first backward pass without
building any per-user gradient; a second backward of the per-user losses reweighted by
``min(1, C / norm)`` then yields the sum of clipped gradients directly. The noise, the
division by the expected batch size and the noise stream are Opacus's, as in
``PrivateStep.privatize``, so both paths give the same mechanism.

Layers without a ghost norm rule (``nn.LayerNorm`` in this model) still get exact norms:
Opacus materialises their per-user gradients (small: two d-vectors per user per LayerNorm),
takes the norm and drops them at once.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.objective import Params

log = logging.getLogger(__name__)

GHOST, HOOKS, FUNCTORCH = "ghost", "per-sample hooks", "per-sample functorch"
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample",
                       "summed_grad")
# Opacus's cleanup leaves these on modules; after a failed pass a stale ``max_batch_len`` would
# silently rescale the next batch's gradients, so they are always removed.
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len")


def ghost_coverage(model: nn.Module) -> dict[str, str]:
    """How Opacus obtains each trainable module's per-user norm under ghost clipping.

    Mirrors Opacus's own dispatch (it recurses only into modules that own no trainable
    parameter or have a registered grad sampler), so a model change that silently moves
    layers onto the slow functorch fallback shows up here.
    """
    gsm = GradSampleModuleFastGradientClipping
    out: dict[str, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if owns:
            kind = type(module)
            out[name] = (GHOST if kind in gsm.NORM_SAMPLERS
                         else HOOKS if kind in gsm.GRAD_SAMPLERS else FUNCTORCH)
            if kind not in gsm.GRAD_SAMPLERS:
                return                      # functorch handles the whole subtree
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return out


def ghost_direction(algorithm: Algorithm, params: Params, batch, max_grad_norm: float,
                    noise_multiplier: float, expected_batch_size: int,
                    generator: torch.Generator) -> Params:
    """Privatised mean FedAvg direction: (sum_u clip_C(g_u) + N(0, (sigma C)^2)) / expected batch.

    ``g_u`` is the gradient of user u's whole-history loss at ``params``; ``params`` are loaded
    into the model, whose parameters then keep those values (as in the hooks path). Noise is
    drawn from ``generator`` tensor by tensor in the order of ``params``, like
    ``PrivateStep.privatize``. An empty batch yields noise only.
    """
    from fedmeta.algorithms.fedavg import FedAvg, _all_targets

    if not isinstance(algorithm, FedAvg):
        raise ValueError(f"privacy.local.grad_sample_mode=ghost clips per-user gradients of the "
                         f"FedAvg loss; algorithm '{algorithm.name}' updates users differently")
    model = algorithm.objective.model
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        extra, missing = sorted(set(params) - set(trainable)), sorted(set(trainable) - set(params))
        raise RuntimeError(f"ghost clipping: params must be exactly the model's trainable tensors "
                           f"(not trainable in the model: {extra[:5]}; trainable but not given: "
                           f"{missing[:5]}), otherwise part of a user's gradient escapes clipping")
    fallback = sorted({name for name, how in ghost_coverage(model).items() if how == FUNCTORCH})
    if fallback:
        log.warning("ghost clipping: %d modules fall back to functorch per-sample gradients: %s",
                    len(fallback), fallback[:5])
    with torch.no_grad():
        for k, v in params.items():
            trainable[k].copy_(v)
    ordered = [trainable[k] for k in params]
    for p in ordered:
        p.grad = None
    n = batch["seq"].shape[0]
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(ordered, lr=0.0), noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
        loss_reduction="mean", generator=generator)
    try:
        if n == 0:
            for p in ordered:
                p.grad = torch.zeros_like(p)
        else:
            full = {k: v.contiguous() for k, v in _all_targets(batch).items()}
            _clipped_sum_into_grad(algorithm, model, full, opt, max_grad_norm)
        opt.pre_step()
        return {k: trainable[k].grad.detach().clone() for k in params}
    finally:
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
            for attr in _OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)


def _clipped_sum_into_grad(algorithm: Algorithm, model: nn.Module, full, opt,
                           max_grad_norm: float) -> None:
    """Two backward passes: per-user norms, then the sum of clipped gradients in ``.grad``."""
    with _training_mode(model), _contiguous_embedding_inputs(model):
        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm,
            use_ghost_clipping=True)
        try:
            hidden, cand = gsm(full["seq"], full["attn"], full["cand"])
            per_user = algorithm.objective.nll(hidden, cand, full, "all")
            with warnings.catch_warnings():
                # embeddings take integer inputs, so their full backward hooks see no input grads
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                DPTensorFastGradientClipping(gsm, opt, per_user, "mean").backward()
            norms = gsm.per_sample_gradient_norms
            log.debug("ghost clipping: %d users, %d clipped, max norm %.4g", len(norms),
                      int((norms > max_grad_norm).sum()), float(norms.max()))
        finally:
            gsm.cleanup()
            for m in model.modules():
                for attr in _OPACUS_MODULE_ATTRS:
                    if hasattr(m, attr):
                        delattr(m, attr)


@contextmanager
def _training_mode(model: nn.Module):
    """Opacus records activations only in training mode; restore each module's own flag."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        yield
    finally:
        for m, was in modes.items():
            m.train(was)


@contextmanager
def _contiguous_embedding_inputs(model: nn.Module):
    """The embedding norm rule ``view``s its index tensor, which fails on expanded ids.

    BERT's position ids arrive as ``arange(L).expand(B, L)``; a pre-hook hands a contiguous
    copy to both the embedding and the Opacus hook that records its input.
    """
    def contiguous(_module, args):
        return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)

    handles = [m.register_forward_pre_hook(contiguous) for m in model.modules()
               if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
