"""The in-process runtime: the round driver with function calls instead of messages.

The reference the Flower runtimes are measured against, and what most tests drive: the
same :class:`~fedmeta.runtime.driver.RoundDriver` and :class:`~fedmeta.runtime.node.Node`
objects the Flower apps use. Silos are built in memory (no partition files), but each
node still keeps its privacy ledger and private tables in its own state directory under
the run directory, exactly as a simulated or deployed node does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmeta.algorithms.base import ClientUpdate
from fedmeta.config import ExperimentConfig
from fedmeta.data.silo import ClientEntry, Silo
from fedmeta.runtime import checkpoint
from fedmeta.runtime.driver import RoundDriver
from fedmeta.runtime.federation import build_silos, initial_parameters, prepare_nodes
from fedmeta.runtime.node import Node

log = logging.getLogger(__name__)


class InProcessTransport:
    """Calls each node directly; a raising node becomes that client's failed reply."""

    name = "inprocess"

    def __init__(self, nodes: list[Node]):
        self.nodes = {n.client_id: n for n in nodes}
        self.order = [n.client_id for n in nodes]

    def clients(self) -> list[ClientEntry]:
        return [ClientEntry(cid, self.nodes[cid].tasks.partition.domain,
                            bool(self.nodes[cid].tasks.partition.new_client), i)
                for i, cid in enumerate(self.order)]

    def _each(self, what: str, server_round: int, params, run, client_ids):
        out = {}
        for cid in client_ids:
            try:
                out[cid] = getattr(self.nodes[cid], what)(params, server_round, run)
            except Exception as err:  # a failing client is dropped, not fatal
                log.exception("client %s failed to %s in round %d", cid, what, server_round)
                out[cid] = err
        return out

    def train(self, server_round, params, run, client_ids) -> dict[str, ClientUpdate | Exception]:
        return self._each("train", server_round, params, run, client_ids)

    def evaluate(self, server_round, params, run, client_ids):
        return self._each("evaluate", server_round, params, run, client_ids)


def build_nodes(cfg: ExperimentConfig, out_dir: Path, silos: list[Silo] | None = None) -> list[Node]:
    silos = silos if silos is not None else build_silos(cfg)
    fresh = not (cfg.runtime.resume and checkpoint.exists(out_dir / "checkpoint"))
    state_root = Path(cfg.runtime.client_state_dir or out_dir / "nodes")
    configs = prepare_nodes(cfg, silos, out_dir / "silos", state_root, fresh, write=False)
    return [Node(nc, silo) for nc, silo in zip(configs, silos)]


def run(cfg: ExperimentConfig, out_dir: str | Path, nodes: list[Node] | None = None,
        stop_after: int | None = None, echo=print) -> dict:
    """Train for ``cfg.runtime.rounds`` rounds (or stop after ``stop_after``, to simulate a kill)."""
    out_dir = Path(out_dir)
    nodes = nodes if nodes is not None else build_nodes(cfg, out_dir)
    catalogues = nodes[0].nc.run["catalogues"]
    driver = RoundDriver(cfg, InProcessTransport(nodes), out_dir,
                         initial_parameters(cfg, nodes[0].device, catalogues), catalogues,
                         echo=echo)
    return driver.run(stop_after)
