"""A node: one client silo, configured by its operator, trained on what the server sends.

A node owns what is private. Its :class:`NodeConfig` (the node's own file in deployment,
derived once by the simulation engine, or built directly in-process) says which silo it
serves, where that silo's data and the node's state live, its device and its privacy
settings. The server sends only global arrays, the round and the run-level
hyper-parameters (:func:`fedmeta.config.run_config`); the node trains only when those equal
the run config it was started with, so a server cannot switch its model, its schedule or
its sampling, and it never sends anything that decides what data is read or how private an
update is.

Under local DP the node's ledger (:mod:`fedmeta.privacy.ledger`) charges a round before
training it, and all of the round's randomness comes from a generator seeded from the OS
CSPRNG (or from the node's own reproducibility secret). What leaves a DP node: the update
(post-processing of privatised steps), a constant weight (1: a task count would be an
un-noised statistic of its users), epsilon/delta/noise settings and whether the budget is
exhausted, and the metrics of evaluation-only users (cold-start users, or every user of a
new client). Training users' (warm) metrics and the raw training loss stay on the node.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from fedmeta.algorithms import build_algorithm
from fedmeta.algorithms.base import ClientUpdate, Step
from fedmeta.algorithms.objective import Objective
from fedmeta.config import (MODEL_SIZES, ConfigError, ExperimentConfig, LocalDPConfig,
                            check_catalogues, resolve, run_config, run_config_diff, to_dict)
from fedmeta.data.silo import Silo, read_silo
from fedmeta.data.tasks import Catalog, build_client_tasks, user_sequences
from fedmeta.eval.protocol import evaluate_client
from fedmeta.model.features import (HashFeaturizer, SharedItemIds, TokenizerFeaturizer,
                                    featurize_items, with_item_ids)
from fedmeta.model.recommender import (build_model, meta_parameters, minilm_dir,
                                      private_parameters, shared_item_rows)
from fedmeta.privacy.accounting import BudgetExceededError
from fedmeta.privacy.ledger import LedgerError, PrivacyLedger, make_plan
from fedmeta.privacy.randomness import check_secret, torch_generator
from fedmeta.runtime.node_state import NodeState

log = logging.getLogger(__name__)

#: the only metrics a DP node's training reply may carry (anything else stays on the node)
DP_REPLY_METRICS = frozenset({"epsilon", "delta", "dp_steps", "budget_exhausted",
                              "private_against_server"})


class RunMismatch(ValueError):
    """The server's run-level config contradicts the node's own."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but no CUDA device is available here")
    return torch.device(name)


@dataclass
class NodeConfig:
    """Everything a node operator decides; nothing here ever comes from the server."""

    client_id: str
    silo_dir: str
    state_dir: str
    run: dict
    privacy: LocalDPConfig = field(default_factory=LocalDPConfig)
    device: str = "auto"
    threads: int = 0

    def __post_init__(self):
        if isinstance(self.privacy, dict):
            known = {f.name for f in fields(LocalDPConfig)}
            unknown = sorted(set(self.privacy) - known)
            if unknown:
                raise ConfigError(f"privacy: unknown key(s) {unknown}; valid: {sorted(known)}")
            self.privacy = LocalDPConfig(**self.privacy)
        if not self.client_id:
            raise ConfigError("client_id: must not be empty")
        if not isinstance(self.run, dict):
            raise ConfigError("run: must be the run-level config (a mapping)")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NodeConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: node config file not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; valid: {sorted(known)}")
        try:
            return cls(**raw)
        except TypeError as err:
            raise ConfigError(f"{path}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def node_configs(cfg: ExperimentConfig, client_ids: list[str], silo_root: str | Path,
                 state_root: str | Path, catalogues: dict[str, int] | None = None
                 ) -> list[NodeConfig]:
    """The simulation engine's one-time derivation of every node's own config."""
    run = run_config(cfg, catalogues)
    return [NodeConfig(cid, str(Path(silo_root) / cid.replace("/", "_")),
                       str(Path(state_root) / cid.replace("/", "_")), run,
                       LocalDPConfig(**to_dict(cfg.privacy.local)), cfg.runtime.device,
                       cfg.runtime.threads)
            for cid in client_ids]


def featurizer_for(cfg: ExperimentConfig):
    width = cfg.model.max_tokens_per_item
    if cfg.model.pretrained == "minilm":
        from transformers import AutoTokenizer

        return TokenizerFeaturizer(AutoTokenizer.from_pretrained(str(minilm_dir()),
                                                                 local_files_only=True), width)
    return HashFeaturizer(MODEL_SIZES[cfg.model.size].vocab, width)


def experiment_view(nc: NodeConfig) -> ExperimentConfig:
    """The node's run config as a validated :class:`ExperimentConfig` (privacy: the node's)."""
    run = nc.run
    try:
        return resolve({"seed": run["seed"], "model": run["model"], "algorithm": run["algorithm"],
                        "data": dict(run["tasks"]), "runtime": {"rounds": run["rounds"],
                                                                "device": nc.device},
                        "privacy": {"local": to_dict(nc.privacy)}})
    except KeyError as err:
        raise ConfigError(f"run: missing key {err.args[0]!r}") from None


class Node:
    """One silo's training and evaluation, behind whatever transport delivers messages."""

    def __init__(self, nc: NodeConfig, silo: Silo | None = None):
        self.nc = nc
        self.cfg = experiment_view(nc)
        self.secret = check_secret(nc.privacy.reproducible_secret,
                                   "privacy.local.reproducible_secret")
        self.device = resolve_device(nc.device)
        if nc.threads > 0:
            torch.set_num_threads(nc.threads)
        silo = silo if silo is not None else read_silo(nc.silo_dir)
        if silo.client_id != nc.client_id:
            raise ConfigError(f"silo_dir: {nc.silo_dir} holds client {silo.client_id!r}, "
                              f"not {nc.client_id!r}")
        catalogues = check_catalogues(nc.run.get("catalogues"), self.cfg.model.item_ids)
        self.tasks = build_tasks(self.cfg, silo, catalogues)
        private_rows = self.tasks.catalog.n_items + 3 if self.cfg.model.private_item_embeddings else 0
        self.model = build_model(self.cfg.model, self.cfg.data.max_len, seed=self.cfg.seed,
                                 private_rows=private_rows,
                                 item_rows=shared_item_rows(self.cfg.model, catalogues)
                                 ).to(self.device)
        self.model.train()
        self.algorithm = build_algorithm(self.cfg.algorithm, Objective(self.model))
        self.state = NodeState(nc.state_dir, nc.client_id)
        # every round's table is kept: a resume may go back to any checkpointed round
        self.store = (self.state.private_table(keep=max(2, self.cfg.runtime.rounds + 1))
                      if private_rows else None)
        log.info("node %s: %d training users, %d cold users, %d catalogue items, device %s, "
                 "local DP %s", nc.client_id, len(self.tasks.train), len(silo.partition.cold_users),
                 self.tasks.catalog.n_items, self.device, "on" if self.dp else "off")

    @property
    def client_id(self) -> str:
        return self.nc.client_id

    @property
    def dp(self) -> bool:
        return self.nc.privacy.enabled

    def describe(self) -> dict:
        p = self.tasks.partition
        return {"client-id": p.client_id, "domain": p.domain, "new-client": bool(p.new_client)}

    # ---- the server's side of the contract -----------------------------------------------
    def check_run(self, run) -> None:
        diff = run_config_diff(self.nc.run, run)
        if diff:
            raise RunMismatch(f"node {self.client_id}: the server's run config contradicts this "
                              f"node's own at {diff[:8]}; refusing the message")

    # ---- privacy -------------------------------------------------------------------------
    def plan(self, solve: bool = True):
        return plan_for(self.nc, self.cfg, len(self.tasks.train), solve)

    def ledger(self) -> PrivacyLedger:
        return self.state.ledger(self.plan(solve=False))

    def privacy_report(self, ledger: PrivacyLedger) -> dict[str, float]:
        """What a DP node tells the server of its privacy: functions of its declared
        settings and of the public schedule only (sigma and q stay in the ledger)."""
        return {"epsilon": ledger.epsilon(), "delta": ledger.plan.delta,
                "private_against_server": 0.0 if self.secret is not None else 1.0}

    # ---- private item table ----------------------------------------------------------------
    def _load_private(self, before_round: int) -> dict[str, torch.Tensor] | None:
        """Always from the node's disk: another worker process may have trained this node's
        later round, so a copy in this process's memory could be stale."""
        if self.store is None:
            return None
        found = self.store.load(before_round)
        return None if found is None else {k: v.to(self.device) for k, v in found[1].items()}

    def _private_or_zero(self, before_round: int) -> dict[str, torch.Tensor]:
        table = self._load_private(before_round)
        if table is not None:
            return table
        return {k: torch.zeros_like(v, device=self.device)
                for k, v in private_parameters(self.model).items()}

    # ---- rounds ------------------------------------------------------------------------------
    def check_arrays(self, params: dict[str, torch.Tensor]) -> None:
        """The global arrays must be exactly the model's meta-parameters (names, shapes,
        dtypes) and finite; checked before anything is charged or trained."""
        expected = meta_parameters(self.model)
        if set(params) != set(expected):
            missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
            raise ValueError(f"node {self.client_id}: refused arrays: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, ref in expected.items():
            t = params[name]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(f"node {self.client_id}: refused array {name}: "
                                 f"{t.dtype}{tuple(t.shape)} != {ref.dtype}{tuple(ref.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"node {self.client_id}: refused array {name}: NaN or Inf")

    def train(self, params: dict[str, torch.Tensor], server_round: int, run) -> ClientUpdate:
        self.check_run(run)
        self.check_arrays(params)
        if len(self.tasks.train) == 0:
            raise ValueError(f"client {self.client_id} has no training tasks")
        params = {k: v.to(self.device) for k, v in params.items()}
        steps = self.cfg.algorithm.local_steps
        if self.dp:
            ledger = self.ledger()
            nonce = ledger.seq            # grows with every charge, across resets too
            try:
                ledger.charge(steps)          # durable before the first step is taken
            except BudgetExceededError:
                log.warning("client %s: round %d would exceed its privacy budget; it stops "
                            "training (and keeps evaluating)", self.client_id, server_round)
                zero = {k: torch.zeros_like(v) for k, v in params.items()}
                return ClientUpdate(zero, 0, {**self.privacy_report(ledger),
                                              "budget_exhausted": 1.0})
            from fedmeta.privacy.local import PrivateStep

            gen = torch_generator(self.secret, f"{self.client_id}/train/{nonce}")
            # the noisy sum is divided by the expected batch q * (declared population): a
            # divisor from the real count would show in the noise's scale
            step: Step = PrivateStep(self.nc.privacy, self.nc.privacy.population,
                                     ledger.plan.sample_rate, ledger.plan.noise_multiplier, gen)
        else:
            gen = torch.Generator().manual_seed(
                zlib.crc32(f"{self.cfg.seed}/{self.client_id}/{server_round}/train".encode()))
            step = Step()
        private = self._private_or_zero(server_round)
        update = self.algorithm.client_update(params, self.tasks, gen, step, self.device, private)
        if self.store is not None and update.private:
            self.store.save(server_round, update.private)
        if self.dp:
            metrics = {**self.privacy_report(ledger), "dp_steps": float(step.steps_taken),
                       "budget_exhausted": 0.0}
            return ClientUpdate(update.delta, 1, metrics)
        return ClientUpdate(update.delta, update.num_tasks, update.metrics)

    def evaluate(self, params: dict[str, torch.Tensor], server_round: int, run) -> list[dict]:
        self.check_run(run)
        params = {**{k: v.to(self.device) for k, v in params.items()},
                  **self._private_or_zero(server_round + 1)}
        seed = zlib.crc32(f"{self.cfg.seed}/{self.client_id}/eval".encode())
        rows = evaluate_client(self.algorithm, params, self.tasks, self.cfg.algorithm.eval_steps,
                               seed, self.device)
        if self.dp:     # training users' metrics are not noised: they stay on the node
            rows = [r for r in rows if r["population"] != "warm"]
        for r in rows:
            r["round"] = server_round
        return rows


def build_tasks(cfg: ExperimentConfig, silo: Silo, catalogues: dict[str, int] | None = None):
    """Silo -> the node's user tasks (catalogue features, support/query splits).

    ``catalogues``: the federation's catalogue sizes (the run config's), which place this
    domain's items in the shared item-ID table; without them (counting users only, as the
    budget set-up does) the features carry no shared-ID column."""
    d, featurizer = cfg.data, featurizer_for(cfg)
    dom = silo.data
    items = dom.items.sort_values("item", kind="stable").reset_index(drop=True)
    feats = featurize_items(items, featurizer, dom.attribute_columns)
    if cfg.model.item_ids == "shared" and catalogues:
        domain = silo.partition.domain
        if catalogues.get(domain) != len(items):
            raise ConfigError(f"run.catalogues.{domain}: the run config says "
                              f"{catalogues.get(domain)} items, but this node's silo "
                              f"({silo.client_id}) has {len(items)}")
        feats = SharedItemIds.for_catalogues(catalogues).with_ids(feats, domain)
    if cfg.model.private_item_embeddings:
        feats = with_item_ids(feats)
    catalog = Catalog(silo.partition.domain, items["item"].tolist(), feats)
    seqs = user_sequences(dom.interactions, catalog)
    seed = cfg.seed + zlib.crc32(silo.client_id.encode()) % 100_003
    return build_client_tasks(silo.partition, seqs, catalog, d.max_len, d.support_fraction,
                              d.n_test, d.k_shot, d.max_eval_users, seed=seed)


def plan_for(nc: NodeConfig, cfg: ExperimentConfig, n_users: int, solve: bool = True):
    planned = cfg.runtime.rounds * cfg.algorithm.local_steps
    return make_plan(nc.privacy, n_users, cfg.algorithm.users_per_step, planned, solve=solve)


def init_budget(nc: NodeConfig, silo: Silo | None = None, reset: bool = False) -> PrivacyLedger | None:
    """Create (or, explicitly, reset) a DP node's privacy budget on its own disk.

    The operator's act (``fedmeta-node init``/``reset-budget``), or the simulation engine's
    when it starts a fresh experiment; a node never does it by itself."""
    if not nc.privacy.enabled:
        return None
    cfg = experiment_view(nc)
    silo = silo if silo is not None else read_silo(nc.silo_dir)
    tasks = build_tasks(cfg, silo, nc.run.get("catalogues"))
    if len(tasks.train) == 0:
        return None                  # a new client never trains: nothing to account
    return NodeState(nc.state_dir, nc.client_id).create_ledger(
        plan_for(nc, cfg, len(tasks.train)), reset=reset)


__all__ = ["DP_REPLY_METRICS", "LedgerError", "Node", "NodeConfig", "RunMismatch", "build_tasks",
           "init_budget", "node_configs", "resolve_device"]
