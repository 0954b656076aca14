"""Attack 1: the server regenerates a node's DP noise from public values and subtracts it.

The attack. A DP node releases ``(clipped sum + noise) / B``. If the noise comes from a
generator whose seed the server can compute, the server draws the same noise, subtracts it
and is left with the clipped sum of the sampled users' directions: no privacy at all. The
old code seeded the noise with ``(seed * 1_000_003 + n_users * 7919 + steps_taken) % 2**63``
-- the run seed, the silo's user count and a step counter, all known to the server.

Observed on the old code (bc7380d, the same tiny config at sigma = 1, SGD at rate 1,
ecommerce-0 with 36 training users, B = 4): the server brute-forced the number of
token-table rows the batch read (r = 268, found in 0.2 s by matching the next parameter's
noise), regenerated every draw from seed ``36 * 7919``, and the residual over the 73,473
non-token coordinates was 0.448 (release norm 67.8): the clipped sum itself, norm 1.79 for
~4 users at C = 1.
3,828 of the 4,096 token-table rows equalled the regenerated noise bit for bit, so the other
268 rows named exactly which item tokens the sampled users' histories contain.

Why it fails now. The node draws all of a round's randomness (Poisson sample, negatives,
noise) from a generator seeded by ``os.urandom`` (:mod:`fedmeta.privacy.randomness`); no
seed the server can derive reproduces it. The tests below try the old formula and other
public seeds, in both draw orders (noise first, as the old code did; sample and negatives
first, as the new code does), even handing the server the true token-row count and sample
size from a spy. The residual keeps the full size of a difference of two independent noise
vectors. Two checks give the statistic power: regenerating from the generator's true state
(an oracle) leaves only the clipped sum, and with ``os.urandom`` patched to a constant two
identical nodes release identical updates -- what any public seeding would look like.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import zlib

import torch

from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"


def _release(fed, tmp_path, name, monkeypatch=None):
    node = sp.make_node(fed, tmp_path / name, CLIENT)
    reply = sp.train(fed, node, 1, CLIENT)
    return reply.update().delta


def _public_seeds(fed, n_users):
    """Every seed a server can compute from what it knows (run seed, client, users, round)."""
    seed, purpose = fed.cfg.seed, f"{CLIENT}/train/0"
    return {
        "old formula, 0 steps taken": sp.old_noise_seed(seed, n_users, 0),
        "old formula, 1 step taken": sp.old_noise_seed(seed, n_users, 1),
        "run seed": seed,
        "crc32(seed/client/round/train)": zlib.crc32(f"{seed}/{CLIENT}/1/train".encode()),
        "crc32(node purpose)": zlib.crc32(purpose.encode()),
        "HMAC(run seed, node purpose)": int.from_bytes(
            hmac.new(str(seed).encode(), purpose.encode(), hashlib.sha256).digest()[:8],
            "big") & ((1 << 63) - 1),
    }


def _regenerate(fed, seed, order, record, n_users):
    gen = torch.Generator().manual_seed(seed)
    if order == "sample first":         # the new code's order: sample, negatives, noise
        k = int((torch.rand(n_users, generator=gen) < record.sample_rate).sum())
        torch.randint(0, fed.n_items[CLIENT], (k, fed.cfg.algorithm.negatives), generator=gen)
    return sp.regenerate_noise(gen, fed.params, record.token_rows)


def test_public_seed_noise_does_not_cancel(fed, tmp_path, monkeypatch):
    steps = sp.spy_private_steps(monkeypatch)
    delta = _release(fed, tmp_path, "node")
    (record,) = steps
    n, B = fed.n_users[CLIENT], fed.expected_batch(CLIENT)
    keys = sp.non_token_keys(fed.params)
    release = sp.flat(delta, keys)
    d = release.numel()
    noise_norm = sp.SIGMA * sp.CLIP * math.sqrt(d) / B
    # the release is noise-sized: sigma C sqrt(d) / B (the clipped sum adds at most k C / B)
    assert sp.relative(float(release.norm()), noise_norm) < 0.03

    signal_bound = record.users * sp.CLIP / B
    for name, seed in _public_seeds(fed, n).items():
        for order in ("noise first", "sample first"):
            guess = _regenerate(fed, seed, order, record, n)
            residual = release - sp.flat(guess, keys) / B
            # a wrong guess leaves two independent noise vectors: sqrt(2) times the noise
            ratio = float(residual.norm()) / (math.sqrt(2) * noise_norm)
            assert 0.97 < ratio < 1.03, (name, order, ratio)
            assert float(residual.norm()) > 50 * signal_bound, (name, order)
            # and no token-table row matches the regenerated whole-table noise
            matches = ((delta[sp.TOKEN_TABLE].double()
                        - guess[sp.FULL_TABLE].double() / B).abs().amax(1) < 1e-6)
            assert int(matches.sum()) == 0, (name, order)

    # power: from the generator's true state (what a public seed would give the server)
    oracle = torch.Generator()
    oracle.set_state(record.gen_state)
    truth = sp.regenerate_noise(oracle, fed.params, record.token_rows)
    residual = release - sp.flat(truth, keys) / B
    assert float(residual.norm()) <= signal_bound + 1e-4       # only the clipped sum is left
    rows = ((delta[sp.TOKEN_TABLE].double() - truth[sp.FULL_TABLE].double() / B)
            .abs().amax(1) < 1e-6)
    # ... and every row the batch did not read is exposed as pure noise
    assert int(rows.sum()) == fed.params[sp.TOKEN_TABLE].shape[0] - record.token_rows


def test_identical_nodes_release_fresh_noise(fed, tmp_path):
    """Same silo, same config, same ledger state, same message: the releases differ by a
    difference of independent noise draws, per-coordinate std sqrt(2) sigma C / B."""
    a = sp.flat(_release(fed, tmp_path, "a"))
    b = sp.flat(_release(fed, tmp_path, "b"))
    diff = a - b
    expected = math.sqrt(2) * fed.noise_std(CLIENT)
    assert sp.relative(float(diff.std()), expected) < 0.02
    assert abs(float(diff.mean())) < 6 * expected / math.sqrt(diff.numel())
    assert float((diff.abs() < 1e-6).double().mean()) < 1e-3    # no shared coordinates


def test_constant_entropy_makes_releases_identical(fed, tmp_path, monkeypatch):
    """The entropy is ``os.urandom``'s: with it stuck, two identical nodes release the very
    same update. A regression to any seed computed from public values looks like this."""
    public = sp.old_noise_seed(fed.cfg.seed, fed.n_users[CLIENT], 0)
    monkeypatch.setattr("fedmeta.privacy.randomness.os.urandom", sp.constant_urandom(public))
    a = _release(fed, tmp_path, "a")
    sp.restart_nodes()
    b = _release(fed, tmp_path, "b")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(sp.flat(a).abs().max()) > 0     # a real (noised) update, not an empty one
