"""Ghost clipping for FedAvg: same mechanism as the explicit per-user path, model left clean."""

import pytest
import torch
from torch import nn

from fedmeta.algorithms import FedAvg, Objective, Reptile
from fedmeta.config import LocalDPConfig
from fedmeta.privacy.accounting import UserLevelAccountant
from fedmeta.privacy.ghost import FUNCTORCH, GHOST, HOOKS, ghost_coverage, ghost_direction
from fedmeta.privacy.local import PrivateStep
from tests.helpers import algo_cfg, tiny_model, toy_client

N_USERS, Q = 10, 0.5          # expected batch 5


def _setup(n=4):
    model, params = tiny_model()
    client = toy_client()
    algo = FedAvg(algo_cfg(), Objective(model))
    batch = Objective.batch(client.train.subset(range(n)), client.catalog, 8,
                            torch.Generator().manual_seed(0), torch.device("cpu"))
    return model, params, algo, batch


def _functorch(algo, params, batch, clip, sigma=0.0, seed=0):
    dp = LocalDPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=clip)
    step = PrivateStep(dp, N_USERS, Q, sigma, torch.Generator().manual_seed(seed),
                       UserLevelAccountant("rdp", 1e-3))
    return step.privatize(algo.user_updates(params, batch), params)


def _ghost(algo, params, batch, clip, sigma=0.0, seed=0):
    return ghost_direction(algo, params, batch, clip, sigma, round(N_USERS * Q),
                           torch.Generator().manual_seed(seed))


def _user_norms(algo, params, batch):
    per_user = algo.user_updates(params, batch)
    return torch.stack([v.flatten(1).double().pow(2).sum(1) for v in per_user.values()]).sum(0).sqrt()


@pytest.mark.parametrize("clip", ["all_clipped", "none_clipped"])
def test_ghost_matches_explicit_per_user_clipping(clip):
    _, params, algo, batch = _setup()
    norms = _user_norms(algo, params, batch)
    c = float(norms.min()) / 4 if clip == "all_clipped" else float(norms.max()) * 4
    a = _functorch(algo, params, batch, c)
    b = _ghost(algo, params, batch, c)
    assert set(b) == set(params)
    scale = max(v.abs().max().item() for v in a.values())
    assert scale > 0
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-5 * max(1.0, scale)), k
    if clip == "none_clipped":      # nothing clipped: the plain mean gradient times n / expected
        plain = algo.mean_update(params, batch)
        for k in params:
            assert torch.allclose(b[k], plain[k] * 4 / 5, atol=1e-5), k


def test_ghost_draws_the_same_noise_as_privatize():
    _, params, algo, batch = _setup()
    a = _functorch(algo, params, batch, 0.05, sigma=1.5, seed=3)
    b = _ghost(algo, params, batch, 0.05, sigma=1.5, seed=3)
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_noise_std_is_sigma_c_over_expected_batch():
    _, params, algo, batch = _setup()
    clean = _ghost(algo, params, batch, 0.5)
    noisy = _ghost(algo, params, batch, 0.5, sigma=2.0, seed=1)
    noise = torch.cat([(noisy[k] - clean[k]).flatten() for k in params])
    assert noise.numel() > 50_000
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.03)
    assert abs(noise.mean().item()) < 0.01


def test_empty_batch_gives_noise_only():
    _, params, algo, batch = _setup()
    empty = {k: v[:0] for k, v in batch.items()}
    out = _ghost(algo, params, empty, 0.5, sigma=2.0)
    noise = torch.cat([v.flatten() for v in out.values()])
    assert noise.std().item() == pytest.approx(0.2, rel=0.03)
    assert all(torch.all(v == 0) for v in _ghost(algo, params, empty, 0.5).values())


def test_model_is_clean_and_usable_afterwards():
    model, params, algo, batch = _setup()
    model.eval()
    shifted = {k: v + 0.01 for k, v in params.items()}
    first = _ghost(algo, shifted, batch, 0.05)
    for k, p in model.named_parameters():
        assert p.grad is None, k
        assert not any(hasattr(p, a) for a in ("grad_sample", "_norm_sample", "_forward_counter",
                                               "summed_grad")), k
        if k in shifted:
            assert torch.equal(p.detach(), shifted[k]), k
    for m in model.modules():
        assert not m.training
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m)
        assert not hasattr(m, "activations") and not hasattr(m, "max_batch_len")
    model.train()
    hidden, cand = model(batch["seq"], batch["attn"], batch["cand"])
    (hidden.sum() + cand.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    # a leftover .grad or hook would change a second call
    second = _ghost(algo, shifted, batch, 0.05)
    for k in params:
        assert torch.equal(first[k], second[k]), k


def test_failed_pass_leaves_no_stale_state():
    model, params, algo, batch = _setup()
    key = "neg" if "neg" in batch else "targets"       # sampled or full-catalogue batch
    bad = {**batch, key: batch[key][:, :3]}            # fails in the loss, after the hooked forward
    with pytest.raises(RuntimeError):
        _ghost(algo, params, bad, 0.05)
    assert not any(hasattr(m, "activations") or hasattr(m, "max_batch_len") for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    a, b = _functorch(algo, params, batch, 0.05), _ghost(algo, params, batch, 0.05)
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_params_must_be_exactly_the_trainable_tensors():
    _, params, algo, batch = _setup()
    partial = dict(list(params.items())[1:])
    with pytest.raises(RuntimeError, match="escapes clipping"):
        _ghost(algo, partial, batch, 0.05)


def test_only_fedavg_is_accepted():
    model, params, _, batch = _setup()
    with pytest.raises(ValueError, match="reptile"):
        ghost_direction(Reptile(algo_cfg(), Objective(model)), params, batch, 0.05, 0.0, 5,
                        torch.Generator())


def test_coverage_of_the_recommender():
    model, _, _, _ = _setup()
    cov = ghost_coverage(model)
    assert FUNCTORCH not in cov.values()
    assert cov["items.tokens"] == GHOST and cov["backbone.embeddings.position_embeddings"] == GHOST
    assert cov["backbone.encoder.layer.0.attention.self.query"] == GHOST
    assert {name for name, how in cov.items() if how == HOOKS} == {
        name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    owners = {k.rsplit(".", 1)[0] for k, p in model.named_parameters() if p.requires_grad}
    assert owners == set(cov)


def test_unsupported_layer_is_reported_as_functorch_fallback():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.inner = nn.Linear(3, 3)

    cov = ghost_coverage(nn.Sequential(nn.Linear(3, 3), Scale()))
    assert cov == {"0": GHOST, "1": FUNCTORCH}      # functorch takes the whole subtree
