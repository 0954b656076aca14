"""The centralised reference: the same model trained on every training silo's data pooled.

What federating costs is measured against a trainer that sees all the training users at
once. Pooling is a function over the federated run's own silos, not a configuration of the
partitioner: ``data.clients`` with one client per domain would draw other cold users
(:func:`fedmeta.data.partition.partition_domain` draws cold users per client group) and
cannot hold out a new client at all (``new_clients`` must be below ``n_clients``), so its
evaluation users would not be the federated run's.

How it runs (:func:`run_centralised`):

* The nodes are built from the federated run's silos exactly as the in-process runtime
  builds them (:func:`fedmeta.runtime.inprocess.build_nodes`), privacy off: same tasks,
  same catalogues, same seeded initial model. Their evaluation users are therefore the
  federated run's, client by client (``tests/tools/test_centralised.py`` checks it).
* Training pools, per domain, the training tasks of every training client (cold users and
  new clients never train, as in the federation). One optimiser (``algorithm.local_optimizer``
  at ``algorithm.local_lr``, its state kept for the whole run) takes
  ``rounds x local_steps`` steps: the number of sequential steps one federated client takes.
  Each step's direction is the users-weighted mean of the algorithm's direction
  (:meth:`~fedmeta.algorithms.base.Algorithm.mean_update`) over a batch of
  ``users_per_step x (training clients of the domain) x fraction_train`` users of every domain,
  in chunks of ``users_per_step``: as many user directions per step as the federation
  computes per round-step, so both spend the same number of user gradients.
  With ``algorithm=fedavg`` this is plain minibatch training on the pooled data.
* Evaluation is each node's own :meth:`~fedmeta.runtime.node.Node.evaluate` at the trained
  parameters (the learners' protocol, adaptation included), recorded after the last step as
  round ``rounds``, written as ``metrics.csv`` and ``summary.json`` like any run.

It is a non-private reference: local and central DP are switched off (a pooled trainer has
no node to privatise), and a per-client private item table has no pooled counterpart, so
``model.private_item_embeddings=true`` is refused.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from fedmeta.algorithms.base import local_optimizer
from fedmeta.config import ConfigError, ExperimentConfig, PrivacyConfig
from fedmeta.data.silo import Silo
from fedmeta.data.tasks import TaskTensors
from fedmeta.model.recommender import meta_parameters
from fedmeta.runtime.inprocess import build_nodes
from fedmeta.runtime.node import Node
from fedmeta.runtime.results import Recorder, write_outputs

log = logging.getLogger(__name__)


def concat_tasks(parts: list[TaskTensors]) -> TaskTensors:
    """Training tasks of several clients of one domain as one pool (rows are per user and
    padded to ``data.max_len``, so they stack)."""
    return TaskTensors([u for p in parts for u in p.users],
                       *(torch.cat([getattr(p, k) for p in parts])
                         for k in ("inputs", "targets", "support", "query", "eval_pos")))


def centralised_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with privacy off (a pooled trainer has no node to privatise), checked."""
    if cfg.model.private_item_embeddings:
        raise ConfigError("model.private_item_embeddings: a per-client private item table has "
                          "no pooled counterpart; the centralised reference needs it false")
    return replace(cfg, privacy=PrivacyConfig())


def centralised_nodes(cfg: ExperimentConfig, silos: list[Silo], out_dir: str | Path) -> list[Node]:
    """The federated run's nodes, privacy off: the pooled trainer's data and evaluators."""
    return build_nodes(centralised_config(cfg), Path(out_dir), silos)


def train_centralised(cfg: ExperimentConfig, nodes: list[Node]) -> dict[str, torch.Tensor]:
    """The meta-parameters after ``rounds x local_steps`` pooled steps (see module doc)."""
    a = cfg.algorithm
    pools: dict[str, list[Node]] = {}
    for n in nodes:
        if not n.tasks.partition.new_client and len(n.tasks.train):
            pools.setdefault(n.tasks.catalog.domain, []).append(n)
    if not pools:
        raise ConfigError("data.clients: the federation has no training client with tasks")
    first = nodes[0]
    device = first.device
    params = {k: v.detach().clone().to(device) for k, v in meta_parameters(first.model).items()}
    local = {k: torch.nn.Parameter(v) for k, v in params.items()}
    opt = local_optimizer(a, list(local.values()))
    domains = []
    for domain, members in sorted(pools.items()):
        train = concat_tasks([m.tasks.train for m in members])
        batch = max(1, round(a.users_per_step * len(members) * cfg.runtime.fraction_train))
        domains.append((domain, members[0], train, min(batch, len(train))))
        log.info("centralised: domain %s pools %d training users of %d clients, %d per step",
                 domain, len(train), len(members), domains[-1][3])
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}/centralised/train".encode()))
    for _ in range(cfg.runtime.rounds * a.local_steps):
        here = {k: v.detach() for k, v in local.items()}
        total = {k: torch.zeros_like(v) for k, v in here.items()}
        count = 0
        for _, node, train, size in domains:
            idx = torch.randperm(len(train), generator=gen)[:size]
            for chunk in idx.split(a.users_per_step):
                part = node.algorithm.objective.batch_for(train.subset(chunk), node.tasks.catalog,
                                                          a.negatives, gen, device)
                direction = node.algorithm.mean_update(here, part)
                for k in total:
                    total[k] += direction[k] * len(chunk)
                count += len(chunk)
        for k, p in local.items():
            p.grad = total[k] / count
        opt.step()
    return {k: v.detach().clone() for k, v in local.items()}


def run_centralised(cfg: ExperimentConfig, silos: list[Silo], out_dir: str | Path) -> dict:
    """Pool, train, evaluate every client with its own node; write the run's outputs."""
    out_dir = Path(out_dir)
    cfg = centralised_config(cfg)
    recorder = Recorder()
    nodes = centralised_nodes(cfg, silos, out_dir)
    t0 = time.time()
    params = train_centralised(cfg, nodes)
    rounds = cfg.runtime.rounds
    for node in nodes:
        recorder.eval_rows(node.evaluate(params, rounds, node.nc.run))
    recorder.rounds.append({"round": rounds, "steps": rounds * cfg.algorithm.local_steps,
                            "seconds": time.time() - t0})
    return write_outputs(out_dir, cfg, recorder, {}, {"runtime": "centralised"})
