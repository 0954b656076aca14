"""Playing a curious or malicious server against real fedmeta nodes.

The tests in this directory are the server's side of the threat model user-level local DP
is meant for: the server is the adversary. Each test builds real node files (a silo on disk,
the node's own config and privacy ledger), sends the real Flower ``ClientApp``
(:data:`clients.app.app`) messages the way a SuperNode would receive them, and then attacks
what comes back. Nothing here reaches into a node except through the message it is sent;
where a test needs to see inside the node (a spy on the Poisson sample, the token rows a
batch read), that is said in the test and only ever makes the attacker *stronger*.

Deliberate choices that make the server's job as easy as possible:

* the run config uses plain SGD with ``local_lr=1`` and one local step, so a node's release
  ``global - local`` is exactly its privatised direction ``(clipped sum + noise) / B``, with
  ``B = round(q n)`` the expected batch (Adam's first step would hide the noise's scale);
* the server knows the run seed, the client ids, every silo's number of training users and
  the round: everything the old code derived its noise seed from.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict

from fedmeta.algorithms.base import ClientUpdate
from fedmeta.config import LocalDPConfig, run_config
from fedmeta.data.silo import Silo, write_silos
from fedmeta.privacy.ledger import HWM, LEDGER
from fedmeta.runtime.node import NodeConfig, init_budget
import wire

#: tiny and fast; SGD at rate 1 makes the release the privatised direction itself
TINY = ["data=synthetic_small", "model=tiny", "runtime.rounds=2", "algorithm.local_steps=1",
        "algorithm.users_per_step=4", "algorithm.negatives=8", "algorithm.inner_steps=1",
        "data.max_eval_users=2", "runtime.plots=false", "algorithm.local_optimizer=sgd",
        "algorithm.local_lr=1.0", "privacy=local", "privacy.local.target_epsilon=null",
        "privacy.local.noise_multiplier=2.0"]
SIGMA, CLIP = 2.0, 1.0     # sigma 2: Opacus RDP at q ~ 0.1 is ~3x faster than at 1
TOKEN_TABLE = "items.tokens.weight"


@dataclass
class Federation:
    """What a server knows of a federation (plus where the test put the silos)."""

    cfg: object
    run: dict
    silo_root: Path
    params: dict[str, torch.Tensor]
    n_users: dict[str, int]                 # training users per training client
    n_items: dict[str, int]                 # catalogue size per client
    silos: dict[str, Silo] = field(repr=False, default_factory=dict)

    @property
    def training_clients(self) -> list[str]:
        return sorted(self.n_users)

    def expected_batch(self, client_id: str) -> int:
        n = self.n_users[client_id]
        q = min(1.0, self.cfg.algorithm.users_per_step / n)
        return max(1, round(q * n))

    def noise_std(self, client_id: str, sigma: float = SIGMA) -> float:
        """Per-coordinate std of a released update's noise: sigma * C / B."""
        return sigma * CLIP / self.expected_batch(client_id)


def build_federation(root: Path) -> Federation:
    from fedmeta.data.silo import catalogue_sizes
    from fedmeta.runtime.federation import build_silos, initial_parameters
    from fedmeta.runtime.hydra_config import compose
    from fedmeta.runtime.node import build_tasks, experiment_view

    cfg = compose(TINY)
    silos = build_silos(cfg)
    silo_root = write_silos(silos, root / "silos")
    sizes = catalogue_sizes(silos)
    run = run_config(cfg, sizes)
    n_users, n_items = {}, {}
    for s in silos:
        if s.partition.new_client:
            continue
        nc = NodeConfig(s.client_id, str(silo_root / s.client_id), str(root / "unused"), run)
        tasks = build_tasks(experiment_view(nc), s, sizes)
        n_users[s.client_id] = len(tasks.train)
        n_items[s.client_id] = tasks.catalog.n_items
    return Federation(cfg, run, silo_root, initial_parameters(cfg, catalogues=sizes), n_users, n_items,
                      {s.client_id: s for s in silos})


def dp(**overrides) -> LocalDPConfig:
    """The node operator's privacy settings: local DP at sigma=1 unless overridden."""
    base = dict(enabled=True, noise_multiplier=SIGMA, target_epsilon=None,
                max_grad_norm=CLIP)
    base.update(overrides)
    return LocalDPConfig(**base)


def make_node(fed: Federation, where: Path, client_id: str, privacy: LocalDPConfig | None = None,
              run: dict | None = None, silo_dir: Path | None = None, init: bool = True,
              declare: bool = True) -> Path:
    """Write one node's own file (and, under DP, create its budget); returns the file.

    ``declare``: the operator declares the population as its full silo's training-user
    count (as the launchers do), unless the settings already name one."""
    from dataclasses import replace

    privacy = dp() if privacy is None else privacy
    if declare and privacy.enabled and privacy.population is None:
        privacy = replace(privacy, population=fed.n_users[client_id])
    nc = NodeConfig(client_id, str(silo_dir or fed.silo_root / client_id),
                    str(where / "state"), json.loads(json.dumps(run or fed.run)), privacy,
                    device="cpu")
    path = nc.save(where / "node.json")
    if init and privacy.enabled:
        init_budget(nc)
    return path


def state_dir(node_file: Path) -> Path:
    return Path(json.loads(Path(node_file).read_text())["state_dir"])


def ledger_bytes(node_file: Path) -> tuple[bytes | None, bytes | None]:
    """The node's ledger and high-water mark exactly as on disk (None: absent)."""
    d = state_dir(node_file)
    return tuple((d / name).read_bytes() if (d / name).exists() else None
                 for name in (LEDGER, HWM))


def private_files(node_file: Path) -> list[Path]:
    d = state_dir(node_file) / "private"
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


def neighbour_silo(fed: Federation, client_id: str, root: Path, drop: int = 0) -> Path:
    """The silo of ``client_id`` without its ``drop``-th training user (add/remove neighbour)."""
    silo = fed.silos[client_id]
    p = silo.partition
    gone = p.train_users[drop]
    part = type(p)(p.client_id, p.domain, tuple(u for u in p.train_users if u != gone),
                   p.cold_users, p.new_client)
    inter = silo.data.interactions
    data = type(silo.data)(inter[inter["user"] != gone].reset_index(drop=True), silo.data.items)
    write_silos([Silo(part, data)], root)
    return root / client_id


# ---- messages ----------------------------------------------------------------------------------
def message(kind: str, content: RecordDict, dst: int = 7) -> Message:
    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                  message_type=kind)
    return Message(content, metadata=md)


def instruction(fed: Federation, server_round: int, client_id: str, run: dict | None = None,
                params: dict | None = None) -> RecordDict:
    """Exactly what an honest server sends (``wire.instruction``)."""
    return wire.instruction(fed.params if params is None else params, server_round,
                            fed.run if run is None else run, client_id)


@dataclass
class Reply:
    message: Message
    error: Exception | None = None

    @property
    def refused(self) -> bool:
        return self.message.has_error()

    def update(self) -> ClientUpdate:
        assert not self.refused, f"the node refused: {self.error!r}"
        return wire.read_update(self.message.content)

    def metric_keys(self) -> set[str]:
        return set(self.message.content[wire.METRICS].keys())

    def rows(self) -> list[dict]:
        assert not self.refused, f"the node refused: {self.error!r}"
        return wire.read_rows(self.message.content)


def deliver(node_file: Path, kind: str, content: RecordDict) -> Reply:
    """Hand one message to the real ClientApp as the SuperNode serving ``node_file`` would.

    A handler that raises becomes an error reply, as every Flower runtime does with it."""
    from clients.app import NODE_KEY
    from clients.app import app as client_app

    msg = message(kind, content)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                  node_config={NODE_KEY: str(node_file)})
    try:
        return Reply(client_app(msg, ctx))
    except Exception as err:   # noqa: BLE001 -- what the runtime does with a raising ClientApp
        return Reply(Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg),
                     err)


def train(fed: Federation, node_file: Path, server_round: int, client_id: str,
          run: dict | None = None, params: dict | None = None) -> Reply:
    return deliver(node_file, "train", instruction(fed, server_round, client_id, run, params))


def restart_nodes() -> None:
    """Forget every cached Node: the next message meets a freshly started process."""
    import clients.app

    clients.app._nodes.clear()


# ---- statistics ----------------------------------------------------------------------------
def flat(delta: dict[str, torch.Tensor], keys=None) -> torch.Tensor:
    keys = list(delta) if keys is None else list(keys)
    return torch.cat([delta[k].detach().double().flatten() for k in keys])


def non_token_keys(params: dict) -> list[str]:
    return [k for k in params if k != TOKEN_TABLE]


def with_config(content: RecordDict, **extra) -> RecordDict:
    """``content`` with extra config entries added (the smuggled settings)."""
    config = dict(content[wire.CONFIG])
    config.update(extra)
    out = RecordDict({k: v for k, v in content.items() if k != wire.CONFIG})
    out[wire.CONFIG] = ConfigRecord(config)
    return out


def old_noise_seed(seed: int, n_users: int, steps_taken: int) -> int:
    """The old code's noise seed (commit bc7380d, fedmeta/privacy/local.py): public values."""
    return (seed * 1_000_003 + n_users * 7919 + steps_taken) % (2 ** 63)


def seed_bytes(seed: int) -> bytes:
    """8 bytes that :func:`fedmeta.privacy.randomness.seed_bits` turns into ``seed``."""
    return int(seed).to_bytes(8, "big")


def constant_urandom(seed: int):
    """An ``os.urandom`` stand-in that always returns the same bytes (a broken CSPRNG)."""
    block = seed_bytes(seed)

    def urandom(n: int) -> bytes:
        return (block * (n // 8 + 1))[:n]

    return urandom


# ---- looking inside a node (only ever to make the attacker stronger) ---------------------------
@dataclass
class StepRecord:
    """What one privatised step did: its Poisson sample, the token rows its batch read, the
    noise generator's state just before the noise was drawn (an oracle no server has)."""

    sample: list[int] = field(default_factory=list)
    users: int = -1
    token_rows: int | None = None
    gen_state: torch.Tensor | None = None
    sample_rate: float = float("nan")


def spy_private_steps(monkeypatch) -> list[StepRecord]:
    """Record every :class:`PrivateStep`'s sample and the state its noise starts from.

    The wrappers call the real methods with the real arguments and return their results
    unchanged; one record per DP step, in order, over every node of the process."""
    from fedmeta.privacy.local import PrivateStep

    records: list[StepRecord] = []
    sample, privatize = PrivateStep.sample, PrivateStep.privatize

    def spy_sample(self, n_users, batch_size, gen):
        idx = sample(self, n_users, batch_size, gen)
        records.append(StepRecord(sample=[int(i) for i in idx], sample_rate=self.q))
        return idx

    def spy_privatize(self, per_user, like, rows=None):
        if not records or records[-1].gen_state is not None:
            records.append(StepRecord())
        rec = records[-1]
        rec.users = int(next(iter(per_user.values())).shape[0])
        rec.token_rows = None if rows is None else int(len(rows))
        rec.gen_state = self.noise_gen.get_state()
        return privatize(self, per_user, like, rows)

    monkeypatch.setattr(PrivateStep, "sample", spy_sample)
    monkeypatch.setattr(PrivateStep, "privatize", spy_privatize)
    return records


FULL_TABLE = "<full token table>"


def regenerate_noise(gen: torch.Generator, like: dict[str, torch.Tensor], token_rows: int | None,
                     sigma: float = SIGMA, clip: float = CLIP) -> dict[str, torch.Tensor]:
    """The draws a privatised step makes, Opacus-style (``_generate_noise``, std sigma*C):
    one tensor per parameter in order, the token table cut to the ``token_rows`` rows the
    batch read, then (after a cut) the whole token table. Unscaled (divide by B)."""
    from opacus.optimizers.optimizer import _generate_noise

    out = {}
    for name, value in like.items():
        shape = value.shape
        if name == TOKEN_TABLE and token_rows is not None:
            shape = torch.Size((token_rows, *shape[1:]))
        out[name] = _generate_noise(std=sigma * clip, reference=torch.zeros(shape), generator=gen)
    if token_rows is not None:
        out[FULL_TABLE] = _generate_noise(std=sigma * clip,
                                          reference=torch.zeros(like[TOKEN_TABLE].shape),
                                          generator=gen)
    return out


def relative(a: float, b: float) -> float:
    return abs(a - b) / b if b else math.inf


__all__ = ["CLIP", "FULL_TABLE", "SIGMA", "TINY", "TOKEN_TABLE", "Federation", "Reply",
           "StepRecord", "build_federation", "regenerate_noise", "spy_private_steps",
           "constant_urandom", "deliver", "dp", "flat", "instruction", "ledger_bytes",
           "make_node", "message", "neighbour_silo", "non_token_keys", "old_noise_seed",
           "private_files", "relative", "restart_nodes", "seed_bytes", "state_dir", "train",
           "with_config"]
