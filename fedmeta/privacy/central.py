"""Central (client-level) DP on the server: fixed clipping, Gaussian noise, one accountant.

Each client's pseudo-gradient is clipped to L2 norm C jointly over every tensor, the clipped
updates are summed with N(0, sigma^2 C^2) noise per coordinate, and the sum is divided by
the number of clients asked this round (a public constant, so adding or removing one
client moves the sum by at most C). The server optimiser then acts on that noisy mean, so
an Adam step or a server rate != 1 is post-processing and keeps the guarantee.

Accounting counts every released round at sampling rate 1: no amplification by client
sampling is claimed, whatever ``runtime.fraction_train`` is, because the guarantee must not
rest on the sample staying secret. Noise comes from the OS CSPRNG unless the server's
``runtime.reproducible_secret`` is set (a simulation option, marked in the outputs).

Adaptive clipping is refused by the config: its quantile estimate is itself a release that
would have to be noised and accounted.

The unit is one client's whole contribution to a round (a *trusted* aggregator still sees
each clipped update: there is no secure aggregation). It composes with user-level local DP
inside the clients; the two guarantees are separate.
"""

from __future__ import annotations

import math

import torch

from fedmeta.config import CentralDPConfig
from fedmeta.privacy.accounting import conservative_epsilon
from fedmeta.privacy.randomness import torch_generator

Params = dict[str, torch.Tensor]


def clip(update: Params, norm: float) -> tuple[Params, float]:
    """``update`` scaled to joint L2 norm <= ``norm``; also its norm before clipping."""
    total = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, total


class CentralDP:
    def __init__(self, dp: CentralDPConfig, num_sampled: int, secret: bytes | None = None,
                 released_rounds: int = 0):
        if num_sampled < 1:
            raise ValueError("central DP needs at least one sampled client per round")
        self.dp, self.num_sampled, self.secret = dp, num_sampled, secret
        self.released = released_rounds

    def aggregate(self, updates: list[Params], server_round: int) -> tuple[Params, dict]:
        """The noisy mean of the clipped updates, and what to record about the release."""
        if not updates:
            raise ValueError("central DP: no update to aggregate")
        sums: Params = {}
        norms = []
        for u in updates:
            clipped, n = clip(u, self.dp.clipping_norm)
            norms.append(n)
            for k, v in clipped.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        gen = torch_generator(self.secret, f"server/central-dp/{server_round}/{self.released}")
        std = self.dp.noise_multiplier * self.dp.clipping_norm
        noisy = {}
        for k, v in sums.items():
            noise = torch.normal(0.0, std, size=v.shape, generator=gen, dtype=torch.float64)
            noisy[k] = ((v.double().cpu() + noise) / self.num_sampled).to(v.dtype).to(v.device)
        self.released += 1
        info = {"released": True, "epsilon": self.epsilon, "delta": self.dp.delta,
                "clipped": sum(n > self.dp.clipping_norm for n in norms),
                "noise_multiplier": self.dp.noise_multiplier,
                "clipping_norm": self.dp.clipping_norm}
        return noisy, info

    def epsilon_after(self, releases: int) -> float:
        if releases == 0:
            return 0.0
        if self.dp.noise_multiplier <= 0:
            return math.inf
        return conservative_epsilon([(self.dp.noise_multiplier, 1.0, releases)], self.dp.delta)

    @property
    def epsilon(self) -> float:
        return self.epsilon_after(self.released)
