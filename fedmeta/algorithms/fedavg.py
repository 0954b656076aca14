"""FedAvg: the baseline every meta-learner must beat.

Local steps are ordinary SGD on users' whole histories (support and query targets); there
is no inner loop in training. At evaluation it is adapted exactly like the meta-learners
(``finetune_steps`` on the support set), which makes it "FedAvg + local fine-tuning".
"""

from __future__ import annotations

from torch.func import grad

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.objective import Params


def _all_targets(batch):
    return {**batch, "all": batch["support"] | batch["query"]}


class FedAvg(Algorithm):
    name = "fedavg"

    def user_updates(self, params: Params, batch) -> Params:
        return self.objective.per_user(
            lambda p, user: grad(self.objective.loss)(p, user, "all"), params, _all_targets(batch))

    def mean_update(self, params: Params, batch) -> Params:
        def mean_loss(p):
            return self.objective.batch_loss(p, _all_targets(batch), "all").mean()
        return grad(mean_loss)(params)
