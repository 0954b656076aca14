"""Randomness a curious server cannot know: the entropy of every DP mechanism.

User-level DP holds against the server only if the server cannot predict the noise (it
would subtract it) or the Poisson sample (amplification by sampling assumes it is secret).
So every generator a DP mechanism draws from is seeded from the operating system's CSPRNG
(``os.urandom``), fresh for every use.

Bit-for-bit reproducible simulations are possible only through an explicit secret read
from the node's (or server's) own configuration: the seed is then HMAC-SHA256(secret,
purpose), where the purpose names the client and a counter the node itself keeps (the
privacy ledger's step count, which only grows). It is never derived from the run seed,
user counts, round numbers or anything else a server knows or sends, and the outputs of
such a run say that it is not private against anyone who knows the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np
import torch

SECRET_MIN_BYTES = 16


def check_secret(secret: str | None, key: str) -> bytes | None:
    """The secret as bytes, or None; a short secret is refused (it could be guessed)."""
    if secret is None or secret == "":
        return None
    raw = secret.encode()
    if len(raw) < SECRET_MIN_BYTES:
        raise ValueError(f"{key}: a reproducibility secret needs at least {SECRET_MIN_BYTES} "
                         f"characters (got {len(raw)})")
    return raw


def seed_bits(secret: bytes | None, purpose: str) -> int:
    """63 bits of seed: from the OS CSPRNG, or HMAC(secret, purpose) for reproducible runs."""
    if secret is None:
        raw = os.urandom(8)
    else:
        raw = hmac.new(secret, purpose.encode(), hashlib.sha256).digest()[:8]
    return int.from_bytes(raw, "big") & ((1 << 63) - 1)


def torch_generator(secret: bytes | None, purpose: str,
                    device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_bits(secret, purpose))


def numpy_generator(secret: bytes | None, purpose: str) -> np.random.Generator:
    return np.random.default_rng(seed_bits(secret, purpose))
