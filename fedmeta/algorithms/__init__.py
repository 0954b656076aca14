"""Federated meta-learning algorithms; each is a subclass of :class:`Algorithm`."""

from fedmeta.algorithms.base import Algorithm, ClientUpdate, ServerOptimizer, Step
from fedmeta.algorithms.fedavg import FedAvg
from fedmeta.algorithms.maml import FOMAML, MAML
from fedmeta.algorithms.objective import Objective
from fedmeta.algorithms.perfedavg import PerFedAvg
from fedmeta.algorithms.reptile import Reptile

from fedmeta.algorithms.registry import REGISTRY, register

for _cls in (FedAvg, Reptile, FOMAML, MAML, PerFedAvg):
    register(_cls)
ALGORITHMS = REGISTRY


def build_algorithm(cfg, objective: Objective) -> Algorithm:
    return REGISTRY[cfg.name](cfg, objective)


__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "FOMAML", "FedAvg", "MAML", "Objective",
           "PerFedAvg", "Reptile", "ServerOptimizer", "Step", "build_algorithm"]
