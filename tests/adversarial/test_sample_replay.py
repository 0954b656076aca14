"""Attack 6: the server predicts which users a node's Poisson sample picked.

The attack. Privacy amplification by sampling -- the reason a DP step at rate q costs far
less than one over the whole silo -- assumes the server does not know which users were in
the step's batch. The old code drew the sample from the round's public generator,
``crc32(f"{seed}/{client}/{round}/train")``: a server could compute it, and with it which
of the (ordered) users, and so which history lengths and items, each step touched.

Observed on the old code (bc7380d): ``PrivateStep.sample`` called ``torch.rand(n,
generator=gen)`` on the generator ``client_generator(seed, client, round, "train")`` passed
in by the round driver, so the sample was a pure function of (run seed, client id, round,
n): the server's prediction ``nonzero(rand(n, crc32("0/<client>/1/train")) < 4/n)`` was
exact, users [2, 15, 35] of ecommerce-0 and [2, 5, 6, 15, 18, 20, 29, 33] of social-0 in
round 1.

Why it fails now. :meth:`PrivateStep.sample` ignores the caller's generator and draws from
the step's own, seeded from ``os.urandom``. Three identical nodes given the identical
message sample different users, and none of the samples a server can compute from public
values (the old generator, the run seed, the old noise seed, the non-DP permutation)
matches. With ``os.urandom`` patched to a constant, two nodes sample identically and the
server's prediction from that constant is exact: the predictor works when the seed is
known, and the seed comes from ``os.urandom`` alone.

The samples are read with a spy on ``PrivateStep.sample`` (the node never sends them).
False-alarm odds: two independent samples of 36 users at q = 1/9 coincide with probability
0.80^36 = 3.6e-4; the tests only fail if *all* of three do, ~1e-7.
"""

from __future__ import annotations

import zlib

import torch

from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"


def _samples(fed, tmp_path, monkeypatch, names):
    steps = sp.spy_private_steps(monkeypatch)
    for name in names:
        node = sp.make_node(fed, tmp_path / name, CLIENT)
        assert not sp.train(fed, node, 1, CLIENT).refused
    assert len(steps) == len(names)           # one DP step per node (local_steps = 1)
    return [s.sample for s in steps], steps[0].sample_rate


def _poisson(seed: int, n: int, q: float) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(n, generator=gen) < q).flatten().tolist()


def _public_predictions(fed, n, q):
    seed = fed.cfg.seed
    round_gen = zlib.crc32(f"{seed}/{CLIENT}/1/train".encode())
    k = min(fed.cfg.algorithm.users_per_step, n)
    return {
        "old: round generator": _poisson(round_gen, n, q),
        "run seed": _poisson(seed, n, q),
        "old noise seed": _poisson(sp.old_noise_seed(seed, n, 0), n, q),
        "node purpose crc32": _poisson(zlib.crc32(f"{CLIENT}/train/0".encode()), n, q),
        "non-DP permutation": sorted(torch.randperm(
            n, generator=torch.Generator().manual_seed(round_gen))[:k].tolist()),
    }


def test_sample_is_not_predictable(fed, tmp_path, monkeypatch):
    samples, q = _samples(fed, tmp_path, monkeypatch, ["a", "b", "c"])
    n = fed.n_users[CLIENT]
    assert q == fed.cfg.algorithm.users_per_step / n
    assert not samples[0] == samples[1] == samples[2]
    for name, predicted in _public_predictions(fed, n, q).items():
        assert not all(s == predicted for s in samples), name


def test_constant_entropy_makes_the_sample_predictable(fed, tmp_path, monkeypatch):
    known = 2024_12_03
    monkeypatch.setattr("fedmeta.privacy.randomness.os.urandom", sp.constant_urandom(known))
    samples, q = _samples(fed, tmp_path, monkeypatch, ["a", "b"])
    assert samples[0] == samples[1]
    assert samples[0] == _poisson(known, fed.n_users[CLIENT], q)
