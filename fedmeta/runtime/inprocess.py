"""The in-process runtime: a plain loop over rounds and clients, no Flower.

It is the reference the Flower runtime is measured against, and what the tests drive:
the same :class:`ClientRunner` and :class:`MetaServer` objects Flower's apps call, with
function calls instead of messages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fedmeta.config import ExperimentConfig
from fedmeta.runtime import checkpoint
from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import Federation, build_federation
from fedmeta.runtime.results import Recorder, progress_line, write_outputs
from fedmeta.runtime.server import MetaServer, select_clients

log = logging.getLogger(__name__)


def nbytes(params: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def is_eval_round(cfg: ExperimentConfig, server_round: int) -> bool:
    every = cfg.runtime.eval_every
    return server_round == cfg.runtime.rounds or (every > 0 and server_round % every == 0)


def run(cfg: ExperimentConfig, out_dir: str | Path, fed: Federation | None = None,
        stop_after: int | None = None, echo=print) -> dict:
    """Train for ``cfg.runtime.rounds`` rounds (or stop after ``stop_after``, to simulate a kill)."""
    out_dir = Path(out_dir)
    fed = fed or build_federation(cfg)
    server = MetaServer(cfg, fed.initial_parameters())
    recorder, states, start = Recorder(), {}, 1
    private: dict[str, dict[str, torch.Tensor]] = {}   # client-side only: never aggregated
    ckpt_dir = out_dir / "checkpoint"
    if cfg.runtime.resume and checkpoint.exists(ckpt_dir):
        ck = checkpoint.load(ckpt_dir)
        server.optimizer.load_state_dict({k: v.to(fed.device) for k, v in ck["params"].items()},
                                         ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        states, recorder.rows, recorder.rounds = ck["client_states"], ck["rows"], ck["rounds"]
        private = {cid: {k: v.to(fed.device) for k, v in t.items()}
                   for cid, t in ck["client_private"].items()}
        start = ck["round"] + 1
        echo(f"resuming from round {ck['round']} ({ckpt_dir})")
    runners = {c.client_id: ClientRunner(fed, c.client_id) for c in fed.clients}
    train_ids = [c.client_id for c in fed.training_clients]
    for rnd in range(start, cfg.runtime.rounds + 1):
        t0 = time.time()
        params = server.params
        replies = {}
        for cid in select_clients(train_ids, cfg.runtime.fraction_train, cfg.seed, rnd):
            try:
                replies[cid], states[cid] = runners[cid].train(params, rnd, states.get(cid),
                                                               private.get(cid))
                if replies[cid].private:
                    private[cid] = replies[cid].private
            except Exception as err:  # a failing client is dropped, not fatal
                log.exception("client %s failed in round %d", cid, rnd)
                replies[cid] = err
        outcome = server.aggregate(replies)
        for cid, reply in replies.items():
            if not isinstance(reply, Exception):
                recorder.train_rows(rnd, cid, runners[cid].tasks.catalog.domain, reply.metrics)
        if is_eval_round(cfg, rnd):
            for runner in runners.values():
                recorder.eval_rows(runner.evaluate(outcome.params, rnd,
                                                   private.get(runner.client_id)))
        seconds = time.time() - t0
        recorder.rounds.append({"round": rnd, "seconds": seconds,
                                "bytes_sent": nbytes(params) * len(replies),
                                "bytes_received": sum(nbytes(r.delta) for r in replies.values()
                                                      if not isinstance(r, Exception)),
                                "clients": len(replies), "accepted": outcome.accepted,
                                "failures": outcome.failures})
        echo(progress_line(rnd, cfg.runtime.rounds, seconds, recorder.frame(),
                           len(outcome.accepted), len(outcome.failures)))
        if rnd % cfg.runtime.checkpoint_every == 0 or rnd == cfg.runtime.rounds:
            checkpoint.save(ckpt_dir, rnd, outcome.params, server.optimizer.state_dict(), states,
                            recorder.rows, recorder.rounds, cfg, client_private=private)
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_at": rnd}
    return write_outputs(out_dir, cfg, recorder, states, {"runtime": "inprocess"})
