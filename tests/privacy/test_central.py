"""Central DP: joint clipping per client, uniform noisy mean, client-level epsilon at rate 1."""

import math

import pytest
import torch

from fedmeta.config import CentralDPConfig, ConfigError
from fedmeta.privacy.accounting import independent_epsilon
from fedmeta.privacy.central import CentralDP, clip


def _updates(n=4, scale=10.0):
    g = torch.Generator().manual_seed(0)
    return [{"a": scale * torch.randn(50, generator=g), "b": scale * torch.randn(3, 4, generator=g)}
            for _ in range(n)]


def test_clip_bounds_the_joint_norm_and_keeps_direction():
    u = _updates(1)[0]
    c, before = clip(u, 1.0)
    total = math.sqrt(sum(float(v.pow(2).sum()) for v in c.values()))
    assert before > 1.0 and total == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(c["a"] * before, u["a"], rtol=1e-5)
    small = {"a": torch.full((2,), 0.1)}
    assert torch.equal(clip(small, 1.0)[0]["a"], small["a"])


def test_without_noise_the_release_is_the_uniform_mean_of_clipped_updates():
    dp = CentralDPConfig(enabled=True, noise_multiplier=0.0, clipping_norm=1.0)
    ups = _updates()
    mean, info = CentralDP(dp, num_sampled=4).aggregate(ups, 1)
    expect = {k: sum(clip(u, 1.0)[0][k] for u in ups) / 4 for k in ups[0]}
    assert all(torch.allclose(mean[k], expect[k], atol=1e-6) for k in expect)
    assert info["clipped"] == 4 and math.isinf(info["epsilon"])


def test_noise_std_is_sigma_c_over_n_and_fresh_unless_a_secret_is_set():
    dp = CentralDPConfig(enabled=True, noise_multiplier=2.0, clipping_norm=0.5)
    zeros = [{"a": torch.zeros(200_000)}] * 4
    a, _ = CentralDP(dp, 4).aggregate(zeros, 1)
    b, _ = CentralDP(dp, 4).aggregate(zeros, 1)
    assert float(a["a"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert not torch.equal(a["a"], b["a"])                 # OS CSPRNG: never the same draw
    s1, _ = CentralDP(dp, 4, secret=b"x" * 16).aggregate(zeros, 1)
    s2, _ = CentralDP(dp, 4, secret=b"x" * 16).aggregate(zeros, 1)
    assert torch.equal(s1["a"], s2["a"])                   # reproducible only with the secret


def test_epsilon_counts_every_release_without_sampling_amplification():
    dp = CentralDPConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
    mech = CentralDP(dp, 4)
    for r in range(3):
        mech.aggregate(_updates(), r + 1)
    assert mech.epsilon == pytest.approx(independent_epsilon([(1.0, 1.0, 3)], 1e-5), rel=0.01)
    assert mech.epsilon_after(1) < mech.epsilon


def test_adaptive_clipping_and_client_side_clipping_are_refused():
    with pytest.raises(ConfigError, match="adaptive"):
        CentralDPConfig(enabled=True, clipping="adaptive")
    with pytest.raises(ConfigError, match="privacy.central.side"):
        CentralDPConfig(enabled=True, side="client")
