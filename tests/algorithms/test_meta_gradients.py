"""The torch.func meta-gradients are the true gradients of the meta-objective."""

import torch

from fedmeta.algorithms import FOMAML, MAML, Objective, PerFedAvg
from fedmeta.algorithms.objective import Objective as Obj
from tests.helpers import algo_cfg, tiny_model, toy_client


def _setup(**kw):
    torch.manual_seed(0)
    model, params = tiny_model()
    params = {k: v.double() for k, v in params.items()}
    model = model.double()
    client = toy_client()
    batch = Obj.batch(client.train.subset(range(3)), client.catalog, 8,
                      torch.Generator().manual_seed(1), torch.device("cpu"))
    return model, params, batch, kw


def _loop_meta_loss(obj, params, batch, steps, lr):
    """Plain autograd, one user at a time, no torch.func: the reference."""
    total = 0.0
    n = batch["seq"].shape[0]
    for u in range(n):
        user = {k: v[u: u + 1] for k, v in batch.items()}
        p = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        for _ in range(steps):
            loss = obj.batch_loss(p, user, "support")[0]
            g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lr * gi for (k, v), gi in zip(p.items(), g)}
        total = total + obj.batch_loss(p, user, "query")[0]
    return total / n


def test_maml_vmap_equals_autograd_loop():
    model, params, batch, _ = _setup()
    obj = Objective(model)
    algo = MAML(algo_cfg(inner_steps=2, inner_lr=0.05), obj)
    vm = algo.mean_update(params, batch)
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(_loop_meta_loss(obj, leaf, batch, 2, 0.05), list(leaf.values()))
    for (name, r) in zip(leaf, ref):
        assert torch.allclose(vm[name], r, atol=1e-9, rtol=1e-6), name


def test_maml_gradient_matches_finite_difference():
    model, params, batch, _ = _setup()
    obj = Objective(model)
    algo = MAML(algo_cfg(inner_steps=1, inner_lr=0.05), obj)
    g = algo.mean_update(params, batch)
    gen = torch.Generator().manual_seed(3)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    eps = 1e-7  # the random direction touches every parameter: curvature is high

    def f(p):
        return float(_loop_meta_loss(obj, p, batch, 1, 0.05))
    plus = f({k: params[k] + eps * direction[k] for k in params})
    minus = f({k: params[k] - eps * direction[k] for k in params})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float((g[k] * direction[k]).sum()) for k in params)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric))


def test_second_order_differs_from_first_order():
    model, params, batch, _ = _setup()
    obj = Objective(model)
    so = MAML(algo_cfg(inner_steps=2, inner_lr=0.5), obj).mean_update(params, batch)
    fo = FOMAML(algo_cfg(inner_steps=2, inner_lr=0.5), obj).mean_update(params, batch)
    diff = sum(float((so[k] - fo[k]).norm()) for k in so)
    assert diff > 1e-6


def test_perfedavg_hf_approximates_one_step_maml():
    model, params, batch, _ = _setup()
    obj = Objective(model)
    maml = MAML(algo_cfg(inner_steps=1, inner_lr=0.05), obj).mean_update(params, batch)
    hf = PerFedAvg(algo_cfg(name="perfedavg", variant="hf", inner_lr=0.05, hf_delta=1e-5), obj).mean_update(params, batch)
    fo = PerFedAvg(algo_cfg(name="perfedavg", variant="fo", inner_lr=0.05), obj).mean_update(params, batch)
    err_hf = sum(float((hf[k] - maml[k]).norm() ** 2) for k in maml) ** 0.5
    err_fo = sum(float((fo[k] - maml[k]).norm() ** 2) for k in maml) ** 0.5
    assert err_hf < 1e-4 * max(1.0, err_fo) or err_hf < 0.1 * err_fo
