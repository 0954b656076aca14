"""The server step, shared by the in-process loop and the Flower ``ServerApp``.

Client updates are checked before they are averaged: a reply with NaN/Inf values, missing
or extra tensors, or wrong shapes is dropped from the round with a warning and counted,
because one broken client must not poison the meta-parameters of everyone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fedmeta.algorithms.base import ClientUpdate, ServerOptimizer
from fedmeta.config import ExperimentConfig
from fedmeta.privacy.randomness import numpy_generator

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    params: dict[str, torch.Tensor]
    accepted: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    central: dict | None = None


def select_clients(client_ids: list[str], fraction: float, seed: int | None, server_round: int,
                   secret: bytes | None = None) -> list[str]:
    """The round's training clients: all of them at fraction 1, else a random subset drawn
    from the OS CSPRNG, or from HMAC(secret, round) when the server has a reproducibility
    secret (never from the public run seed: a sample the clients could predict is one the
    server could be made to replay)."""
    k = max(1, round(len(client_ids) * fraction))
    if k >= len(client_ids):
        return sorted(client_ids)
    rng = numpy_generator(secret, f"server/select/{server_round}")
    return sorted(rng.choice(sorted(client_ids), size=k, replace=False).tolist())


def check_update(update: ClientUpdate, reference: dict[str, torch.Tensor]) -> str | None:
    """Why an update is unusable, or None."""
    if set(update.delta) != set(reference):
        missing, extra = set(reference) - set(update.delta), set(update.delta) - set(reference)
        return f"tensor names differ (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for name, ref in reference.items():
        t = update.delta[name]
        if tuple(t.shape) != tuple(ref.shape):
            return f"{name}: shape {tuple(t.shape)} != {tuple(ref.shape)}"
        if not torch.isfinite(t).all():
            return f"{name}: contains NaN or Inf"
    if update.num_tasks < 0:
        return f"negative task count {update.num_tasks}"
    return None


class MetaServer:
    def __init__(self, cfg: ExperimentConfig, params: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.optimizer = ServerOptimizer(params, cfg.algorithm.server_optimizer,
                                         cfg.algorithm.server_lr)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.optimizer.current()

    def aggregate(self, replies: dict[str, ClientUpdate | Exception], central=None,
                  server_round: int = 0) -> RoundOutcome:
        """Validate, then the server step; with ``central`` (a
        :class:`~fedmeta.privacy.central.CentralDP`) every training client weighs the same and
        the optimiser acts on the clipped, noised mean."""
        reference = self.optimizer.params
        good, failures = [], {}
        for cid, reply in sorted(replies.items()):
            why = (f"{type(reply).__name__}: {reply}" if isinstance(reply, Exception)
                   else check_update(reply, reference))
            if why is None:
                good.append((cid, reply))
            else:
                failures[cid] = why
                log.warning("dropping client %s from this round: %s", cid, why)
        training = [(cid, u) for cid, u in good if u.num_tasks > 0]
        if len(good) < self.cfg.runtime.min_clients:
            raise RuntimeError(f"only {len(good)} valid replies, runtime.min_clients="
                               f"{self.cfg.runtime.min_clients}; failures: {failures}")
        info = None
        if training and central is not None:
            mean, info = central.aggregate([u.delta for _, u in training], server_round)
            self.optimizer.step([ClientUpdate(mean, 1)])
        elif training:
            self.optimizer.step([u for _, u in training])
        return RoundOutcome(self.params, [cid for cid, _ in training], failures, info)
