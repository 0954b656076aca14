"""Reptile (Nichol et al., 2018) with one user per task.

Each sampled user adapts separately for ``inner_steps`` SGD steps on its whole history;
the user's update direction is ``theta - phi_u``, so a local step with rate ``local_lr`` is
Reptile's interpolation towards the users' adapted weights.
"""

from __future__ import annotations

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.fedavg import _all_targets
from fedmeta.algorithms.objective import Params


class Reptile(Algorithm):
    name = "reptile"

    def user_updates(self, params: Params, batch) -> Params:
        steps, lr = max(self.cfg.inner_steps, 1), self.cfg.inner_lr

        def one(p, user):
            phi = self.objective.adapt(p, user, steps, lr, "all")
            return {k: p[k] - phi[k] for k in p}
        return self.objective.per_user(one, params, _all_targets(batch))
