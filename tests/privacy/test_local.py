"""User-level DP-SGD step: clipping, noise scale, coverage of every parameter, accounting."""

import pytest
import torch

from fedmeta.algorithms import FOMAML, MAML, FedAvg, Objective, Reptile
from fedmeta.config import ExperimentConfig, LocalDPConfig
from fedmeta.privacy.accounting import UserLevelAccountant
from fedmeta.privacy.local import PrivateStep
from tests.helpers import algo_cfg, tiny_model, toy_client


def _step(sigma=0.0, clip=1.0, n_users=10, q=0.5, mode="functorch"):
    dp = LocalDPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode)
    return PrivateStep(dp, n_users, q, sigma, torch.Generator().manual_seed(0),
                       UserLevelAccountant("rdp", 1e-3))


def _norm(d):
    return float(sum((v.double() ** 2).sum() for v in d.values()) ** 0.5)


def test_each_user_is_clipped_to_c_and_direction_kept():
    gen = torch.Generator().manual_seed(0)
    like = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    per_user = {"a": 10 * torch.randn(4, 5, 3, generator=gen), "b": 10 * torch.randn(4, 7, generator=gen)}
    step = _step(clip=0.7, n_users=8, q=0.5)          # expected batch 4
    out = step.privatize(per_user, like)
    expected = {k: torch.zeros_like(v) for k, v in like.items()}
    for u in range(4):
        g = {k: v[u] for k, v in per_user.items()}
        factor = min(1.0, 0.7 / _norm(g))
        for k in g:
            expected[k] += g[k] * factor / 4
        single = _step(clip=0.7, n_users=8, q=0.5).privatize({k: v[u:u + 1] for k, v in per_user.items()}, like)
        assert _norm(single) * 4 <= 0.7 + 1e-6           # the user's clipped contribution
    for k in like:
        assert torch.allclose(out[k], expected[k], atol=1e-6)


def test_small_updates_are_not_clipped():
    like = {"a": torch.zeros(3)}
    per_user = {"a": torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])}
    out = _step(clip=1.0, n_users=4, q=0.5).privatize(per_user, like)
    assert torch.allclose(out["a"], per_user["a"].sum(0) / 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_user_with_a_non_finite_direction_contributes_zero(bad):
    """NaN or inf in one entry of one user's direction: that user is dropped, the release
    stays finite and equals the release without that user's direction (same noise draw)."""
    gen = torch.Generator().manual_seed(3)
    like = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    per_user = {"a": torch.randn(4, 5, 3, generator=gen), "b": torch.randn(4, 7, generator=gen)}
    poisoned = {k: v.clone() for k, v in per_user.items()}
    poisoned["b"][2, 4] = bad
    zeroed = {k: v.clone() for k, v in per_user.items()}
    for v in zeroed.values():
        v[2] = 0.0
    out = _step(sigma=0.5, n_users=8).privatize(poisoned, like)
    ref = _step(sigma=0.5, n_users=8).privatize(zeroed, like)
    for k in like:
        assert torch.isfinite(out[k]).all()
        assert torch.equal(out[k], ref[k])


def test_noise_std_is_sigma_c_over_expected_batch():
    like = {"a": torch.zeros(200_000)}
    step = _step(sigma=2.0, clip=0.5, n_users=20, q=0.25)    # expected batch 5
    out = step.privatize({"a": torch.zeros(3, 200_000)}, like)
    assert out["a"].std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.02)
    assert abs(out["a"].mean().item()) < 0.01


# ---- the cut token table (only the rows a batch read are computed per user) ---------------
TABLE = "items.tokens.weight"


@pytest.mark.parametrize("algo_cls", [FedAvg, MAML])
def test_privatising_the_cut_table_equals_privatising_the_whole_table(algo_cls):
    """Without noise the two give the same clipped mean: the rows not read add nothing."""
    model, params = tiny_model()
    client = toy_client()
    algo = algo_cls(algo_cfg(), Objective(model))
    batch = Objective.batch(client.train.subset(range(5)), client.catalog, 8,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    whole = _step(clip=0.05, n_users=len(client.train)).privatize(algo.user_updates(params, batch),
                                                                  params)
    step = _step(clip=0.05, n_users=len(client.train))
    cut_dir = step.direction(algo, params, batch)
    assert set(cut_dir) == set(params)
    for k in params:
        torch.testing.assert_close(cut_dir[k], whole[k], rtol=1e-5, atol=1e-8)
    assert whole[TABLE].abs().sum() > 0


def test_every_row_of_the_cut_table_is_noised_with_sigma_c_over_expected_batch():
    """Rows the batch did not read still move, by exactly the noise they would have had."""
    vocab, dim = 50_000, 8
    like = {TABLE: torch.zeros(vocab, dim), "b": torch.zeros(3)}
    rows = torch.tensor([0, 7, 123, 40_000])
    step = _step(sigma=2.0, clip=0.5, n_users=20, q=0.25)      # expected batch 5
    out = step.privatize({TABLE: torch.zeros(4, len(rows), dim), "b": torch.zeros(4, 3)}, like,
                         rows)
    table = out[TABLE]
    assert table.shape == (vocab, dim) and (table != 0).all()
    assert table.std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.02)
    assert table[rows].std().item() > 0


def test_a_cut_table_of_the_wrong_size_fails_loudly():
    like = {TABLE: torch.zeros(100, 4)}
    with pytest.raises(RuntimeError, match="expected"):
        _step().privatize({TABLE: torch.zeros(2, 5, 4)}, like, torch.arange(3))
    with pytest.raises(RuntimeError, match="expected"):
        _step().privatize({TABLE: torch.zeros(2, 5, 4)}, like)


def test_a_missing_parameter_fails_loudly():
    with pytest.raises(RuntimeError, match="every meta-parameter"):
        _step().privatize({"a": torch.zeros(2, 3)}, {"a": torch.zeros(3), "b": torch.zeros(2)})


@pytest.mark.parametrize("algo_cls", [FedAvg, Reptile, FOMAML, MAML])
def test_every_trainable_parameter_is_privatised(algo_cls):
    model, params = tiny_model()
    client = toy_client()
    algo = algo_cls(algo_cfg(), Objective(model))
    step = _step(sigma=1.0, n_users=len(client.train), q=0.5)
    batch = Objective.batch(client.train.subset(range(4)), client.catalog, 8,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    out = step.direction(algo, params, batch)
    assert set(out) == set(params)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in out.values())
    assert step.accountant.epsilon() > 0


def test_opacus_hooks_and_functorch_agree_for_fedavg():
    model, params = tiny_model()
    client = toy_client()
    algo = FedAvg(algo_cfg(), Objective(model))
    batch = Objective.batch(client.train.subset(range(4)), client.catalog, 8,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    a = _step(clip=0.05, mode="functorch").direction(algo, params, batch)
    b = _step(clip=0.05, mode="hooks").direction(algo, params, batch)
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_poisson_sampling_rate():
    step = _step(n_users=1000, q=0.1)
    gen = torch.Generator().manual_seed(0)
    sizes = [len(step.sample(1000, 0, gen)) for _ in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(100, rel=0.05)
    assert len(set(sizes)) > 5      # variable batch sizes, not a fixed batch


def test_secure_mode_noise_has_the_same_scale():
    dp = LocalDPConfig(enabled=True, noise_multiplier=1.0, secure_mode=True)
    step = PrivateStep(dp, 10, 0.5, 1.0, torch.Generator().manual_seed(1))
    out = step.privatize({"a": torch.zeros(4, 200_000)}, {"a": torch.zeros(200_000)})
    assert float(out["a"].std()) == pytest.approx(1.0 / 5, rel=0.02)   # sigma*C / expected batch
    assert step._optimizer.secure_mode


def test_an_empty_poisson_sample_releases_pure_noise():
    """Poisson sampling may pick nobody: the step must still release (noise only)."""
    step = _step(sigma=1.0, n_users=10, q=0.5)
    like = {"a": torch.zeros(5, 3), "b": torch.zeros(7)}
    out = step.privatize({k: v.new_zeros((0, *v.shape)) for k, v in like.items()}, like)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in out.values())
