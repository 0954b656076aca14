"""The one federated-round loop: select -> send -> collect -> aggregate -> evaluate -> checkpoint.

Every runtime runs this loop; only the :class:`Transport` differs (function calls on
in-process :class:`~fedmeta.runtime.node.Node` objects, or Flower messages through a
``Grid`` in ``server/``). So in-process, Flower simulation and Flower deployment give the
same metrics for the same seed by construction.

What the loop sends a node: the global arrays, the round, and the run-level config
(:func:`fedmeta.config.run_config`). What it keeps: the meta-parameters and the server
optimiser's state, the metric rows, and each client's last reported epsilon/delta (for the
outputs; a node's accountant lives on the node and is never sent back).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import torch

from fedmeta.algorithms.base import ClientUpdate
from fedmeta.config import ConfigError, ExperimentConfig, run_config, to_dict
from fedmeta.data.silo import ClientEntry
from fedmeta.privacy.central import CentralDP
from fedmeta.privacy.randomness import check_secret
from fedmeta.runtime import checkpoint
from fedmeta.runtime.results import Recorder, progress_line, summary_table, write_outputs
from fedmeta.runtime.server import MetaServer, select_clients

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


class Transport(Protocol):
    """How the loop reaches nodes. Replies are values or the exception that replaced them."""

    name: str

    def clients(self) -> list[ClientEntry]: ...

    def train(self, server_round: int, params: Params, run: dict,
              client_ids: list[str]) -> dict[str, ClientUpdate | Exception]: ...

    def evaluate(self, server_round: int, params: Params, run: dict,
                 client_ids: list[str]) -> dict[str, list[dict] | Exception]: ...


def nbytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def is_eval_round(cfg: ExperimentConfig, server_round: int) -> bool:
    every = cfg.runtime.eval_every
    return server_round == cfg.runtime.rounds or (every > 0 and server_round % every == 0)


IGNORED_ON_RESUME = {"runtime.resume", "runtime.plots", "runtime.verbose", "runtime.timeout",
                     "output_dir"}


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, name))
        elif a != b and name not in IGNORED_ON_RESUME:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


class RoundDriver:
    def __init__(self, cfg: ExperimentConfig, transport: Transport, out_dir: str | Path,
                 initial: Params, catalogues: dict[str, int] | None = None, echo=print):
        """``catalogues``: the federation's catalogue sizes (its manifest's), sent in the run
        config; ``initial`` must have been built for them (``initial_parameters``)."""
        self.cfg, self.transport, self.echo = cfg, transport, echo
        self.out_dir = Path(out_dir)
        self.server = MetaServer(cfg, initial)
        self.recorder = Recorder()
        self.privacy: dict[str, dict] = {}
        self.secret = check_secret(cfg.runtime.reproducible_secret, "runtime.reproducible_secret")
        self.start = 1
        self.run_cfg = run_config(cfg, catalogues)

    # ---- checkpoints ----------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def resume(self) -> None:
        if not (self.cfg.runtime.resume and checkpoint.exists(self.ckpt_dir)):
            return
        ck = checkpoint.load(self.ckpt_dir)
        changed = config_changes(ck["config"], to_dict(self.cfg))
        if changed:
            raise ConfigError("runtime.resume: the config differs from the checkpointed run's "
                              f"({self.ckpt_dir}): {'; '.join(changed[:10])}")
        device = next(iter(self.server.optimizer.params.values())).device
        self.server.optimizer.load_state_dict({k: v.to(device) for k, v in ck["params"].items()},
                                              ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        self.recorder.rows, self.recorder.rounds = ck["rows"], ck["rounds"]
        self.privacy = ck["client_privacy"]
        self.start = ck["round"] + 1
        self.echo(f"resuming from round {ck['round']} ({self.ckpt_dir})")

    # ---- the loop -------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        entries = {c.client_id: c for c in self.transport.clients()}
        order = sorted(entries, key=lambda c: entries[c].order)
        train_ids = [c for c in order if not entries[c].new_client]
        if not train_ids:
            raise ConfigError("data.clients: the federation has no training client")
        num_sampled = len(select_clients(train_ids, cfg.runtime.fraction_train, None, 1, self.secret))
        released = sum(1 for r in self.recorder.rounds if (r.get("central_dp") or {}).get("released"))
        central = (CentralDP(cfg.privacy.central, num_sampled, self.secret, released)
                   if cfg.privacy.central.enabled else None)
        for rnd in range(self.start, cfg.runtime.rounds + 1):
            t0 = time.time()
            params = self.server.params
            chosen = select_clients(train_ids, cfg.runtime.fraction_train, cfg.seed, rnd,
                                    self.secret)
            replies = self.transport.train(rnd, params, self.run_cfg, chosen)
            for cid in chosen:
                replies.setdefault(cid, TimeoutError("no reply within runtime.timeout"))
            info = {"round": rnd, "clients": len(chosen), "bytes_sent": nbytes(params) * len(chosen),
                    "bytes_received": sum(nbytes(r.delta) for r in replies.values()
                                          if isinstance(r, ClientUpdate))}
            outcome = self.server.aggregate(replies, central=central, server_round=rnd)
            info.update(accepted=outcome.accepted, failures=outcome.failures)
            if outcome.central is not None:
                info["central_dp"] = outcome.central
                self.recorder.train_rows(rnd, "server", "all",
                                         {"central_epsilon": outcome.central["epsilon"]})
            for cid, reply in replies.items():
                if isinstance(reply, ClientUpdate):
                    self.recorder.train_rows(rnd, cid, entries[cid].domain, reply.metrics)
                    if "epsilon" in reply.metrics:
                        self.privacy[cid] = {k: reply.metrics[k] for k in
                                             ("epsilon", "delta", "private_against_server")
                                             if k in reply.metrics}
            if is_eval_round(cfg, rnd):
                results = self.transport.evaluate(rnd, outcome.params, self.run_cfg, order)
                failed = {}
                for cid in order:       # federation order, whatever order replies came in
                    res = results.get(cid, TimeoutError("no reply within runtime.timeout"))
                    if isinstance(res, Exception):
                        failed[cid] = f"{type(res).__name__}: {res}"
                        log.warning("evaluation of client %s failed in round %d: %s", cid, rnd,
                                    failed[cid])
                    else:
                        self.recorder.eval_rows(res)
                info["eval_failures"] = failed
            info["seconds"] = time.time() - t0
            self.recorder.rounds.append(info)
            line = progress_line(rnd, cfg.runtime.rounds, info["seconds"], self.recorder.frame(),
                                 len(outcome.accepted), len(outcome.failures),
                                 elapsed=time.time() - self.recorder.started)
            self.echo(line + (f" | central-eps {outcome.central['epsilon']:.3f}"
                              if outcome.central else ""))
            if rnd % cfg.runtime.checkpoint_every == 0 or rnd == cfg.runtime.rounds:
                checkpoint.save(self.ckpt_dir, rnd, outcome.params, self.server.optimizer.state_dict(),
                                self.privacy, self.recorder.rows, self.recorder.rounds, cfg)
            if stop_after is not None and rnd >= stop_after:
                return {"stopped_at": rnd}
        extra = {"runtime": self.transport.name}
        if central is not None:
            counts: dict[str, int] = {}
            for r in self.recorder.rounds:
                if (r.get("central_dp") or {}).get("released"):
                    for cid in r["accepted"]:
                        counts[cid] = counts.get(cid, 0) + 1
            extra["central_dp"] = {"epsilon": central.epsilon, "delta": cfg.privacy.central.delta,
                                   "sampling_amplification": False,
                                   "client_epsilon": {c: central.epsilon_after(n)
                                                      for c, n in sorted(counts.items())}}
        summary = write_outputs(self.out_dir, cfg, self.recorder, self.privacy, extra)
        self.echo(summary_table(summary, self.out_dir))
        return summary
