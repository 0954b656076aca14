"""Per-FedAvg (Fallah et al., 2020) with one user per task.

One inner step (the personalisation step Per-FedAvg is defined with), then:
- ``variant=fo``: the query gradient at the adapted point (first-order);
- ``variant=hf``: Hessian-free -- the query gradient g is corrected by
  ``alpha * H_support(theta) g``, the Hessian-vector product estimated by central finite
  differences of support gradients, which needs no second-order autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import grad

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.objective import Params
from fedmeta.config import AlgorithmConfig, ConfigError


@dataclass
class PerFedAvgConfig(AlgorithmConfig):
    variant: str = "fo"           # fo | hf
    hf_delta: float = 1e-3        # HF finite-difference step

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("fo", "hf"):
            raise ConfigError(f"algorithm.variant: {self.variant!r} is not one of ['fo', 'hf']")
        if not self.hf_delta > 0:
            raise ConfigError(f"algorithm.hf_delta: {self.hf_delta!r} is invalid (must be > 0)")


class PerFedAvg(Algorithm):
    name = "perfedavg"
    Config = PerFedAvgConfig

    def user_updates(self, params: Params, batch) -> Params:
        obj, lr, delta = self.objective, self.cfg.inner_lr, self.cfg.hf_delta
        hf = self.cfg.variant == "hf"

        def one(p, user):
            g_s = grad(obj.loss)(p, user, "support")
            phi = {k: p[k] - lr * g_s[k] for k in p}
            g_q = grad(obj.loss)(phi, user, "query")
            if not hf:
                return g_q
            plus = grad(obj.loss)({k: p[k] + delta * g_q[k] for k in p}, user, "support")
            minus = grad(obj.loss)({k: p[k] - delta * g_q[k] for k in p}, user, "support")
            return {k: g_q[k] - lr * (plus[k] - minus[k]) / (2 * delta) for k in p}
        return obj.per_user(one, params, batch)
