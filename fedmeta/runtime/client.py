"""What one client does in a round, independent of how messages travel.

The in-process loop calls this directly; the Flower ``ClientApp`` calls it after decoding a
message. Anything that must outlive a round (the DP accountant) goes in and out as a plain
``state`` dict, which Flower keeps in ``Context.state`` and the checkpoint keeps on disk (and
which is also sent to the server, so it holds accounting only). The private item table, when
the model has one, travels separately as ``private``: the caller keeps it on the client side.
Randomness is derived from (seed, client, round), so a resumed run draws what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import logging
import zlib

import torch

from fedmeta.algorithms.base import ClientUpdate, Step
from fedmeta.eval.protocol import evaluate_client
from fedmeta.runtime.federation import Federation

log = logging.getLogger(__name__)


def client_generator(seed: int, client_id: str, server_round: int, purpose: str) -> torch.Generator:
    key = zlib.crc32(f"{seed}/{client_id}/{server_round}/{purpose}".encode())
    return torch.Generator().manual_seed(key)


class ClientRunner:
    def __init__(self, fed: Federation, client_id: str):
        self.fed = fed
        self.tasks = fed.client(client_id)
        self.client_id = client_id

    def make_step(self, state: dict) -> Step:
        local = self.fed.cfg.privacy.local
        if not local.enabled:
            return Step()
        from fedmeta.privacy.local import UNCONFIRMED, PrivateStep

        step = PrivateStep.for_client(self.fed.cfg, n_users=len(self.tasks.train), state=state)
        state.pop(UNCONFIRMED, None)       # charged into the accountant: never twice
        return step

    def private(self, private: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The client's private tensors on the device, or the initial (zero) table."""
        expected = self.fed.initial_private()
        if not private:
            return expected
        if set(private) != set(expected) or any(private[k].shape != v.shape
                                                for k, v in expected.items()):
            raise ValueError(f"client {self.client_id}: stored private tensors "
                             f"{ {k: tuple(v.shape) for k, v in private.items()} } do not match "
                             f"the model's { {k: tuple(v.shape) for k, v in expected.items()} }")
        return {k: v.to(self.fed.device) for k, v in private.items()}

    def train(self, params: dict[str, torch.Tensor], server_round: int,
              state: dict | None = None,
              private: dict[str, torch.Tensor] | None = None) -> tuple[ClientUpdate, dict]:
        """One round of local training. The returned update's ``private`` is the client's new
        private table (empty without one): keep it, never send it."""
        state = dict(state or {})
        params = {k: v.to(self.fed.device) for k, v in params.items()}
        private = self.private(private)
        if len(self.tasks.train) == 0:
            raise ValueError(f"client {self.client_id} has no training tasks")
        step = self.make_step(state)
        if not step.affordable(self.fed.cfg.algorithm.local_steps):
            log.warning("client %s: training in round %d would exceed its privacy budget; "
                        "it stops training (and keeps evaluating)", self.client_id, server_round)
            zero = {k: torch.zeros_like(v) for k, v in params.items()}
            state.update(step.state_dict())
            return ClientUpdate(zero, 0, {"budget_exhausted": 1.0, **step.after_round()},
                                private), state
        gen = client_generator(self.fed.cfg.seed, self.client_id, server_round, "train")
        update = self.fed.algorithm.client_update(params, self.tasks, gen, step, self.fed.device,
                                                  private)
        state.update(step.state_dict())
        return update, state

    def evaluate(self, params: dict[str, torch.Tensor], server_round: int,
                 private: dict[str, torch.Tensor] | None = None) -> list[dict]:
        params = {**{k: v.to(self.fed.device) for k, v in params.items()}, **self.private(private)}
        seed = zlib.crc32(f"{self.fed.cfg.seed}/{self.client_id}/eval".encode())
        rows = evaluate_client(self.fed.algorithm, params, self.tasks,
                               self.fed.cfg.algorithm.eval_steps, seed, self.fed.device)
        for r in rows:
            r["round"] = server_round
        return rows
