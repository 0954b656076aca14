"""MAML (Finn et al., 2017) with one user per task, first- and second-order.

Inner loop: ``inner_steps`` SGD steps with rate alpha on the user's support (earlier)
interactions. Outer objective: the query (later) loss at the adapted parameters.
The second-order meta-gradient differentiates through the inner loop with ``torch.func``
(``grad`` of a function that itself calls ``grad``), vmapped over users.
"""

from __future__ import annotations

from torch.func import grad

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.objective import Params


class FOMAML(Algorithm):
    """First-order MAML (FedMeta-FOMAML): the query gradient at phi_u, inner loop detached."""

    name = "fomaml"

    def user_updates(self, params: Params, batch) -> Params:
        obj, steps, lr = self.objective, self.cfg.inner_steps, self.cfg.inner_lr
        phi = obj.per_user(lambda p, u: obj.adapt(p, u, steps, lr, "support"), params, batch)
        phi = {k: v.detach() for k, v in phi.items()}
        return obj.per_user_params(lambda p, u: grad(obj.loss)(p, u, "query"), phi, batch)


class MAML(Algorithm):
    """Second-order MAML: d/d theta of the query loss at adapt(theta)."""

    name = "maml"

    def query_after_adapt(self, params: Params, user):
        phi = self.objective.adapt(params, user, self.cfg.inner_steps, self.cfg.inner_lr, "support")
        return self.objective.loss(phi, user, "query")

    def user_updates(self, params: Params, batch) -> Params:
        return self.objective.per_user(grad(self.query_after_adapt), params, batch)
