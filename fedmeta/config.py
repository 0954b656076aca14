"""Typed experiment configuration.

The dataclasses here are the schema of the Hydra config groups in ``configs/`` (``data/``,
``model/``, ``algorithm/``, ``privacy/``, ``runtime/``). Hydra merges YAML onto them, and
:func:`resolve` turns the merged config into plain dataclass objects, which runs every
``__post_init__`` check, so a bad value fails before any data is loaded or model built, with
the dotted key and the allowed values in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the dotted key."""


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {sorted(allowed)}")


def _check(key: str, ok: bool, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid ({why})")


@dataclass
class DomainClients:
    """How one domain's users are split into client silos."""

    domain: str = "ecommerce"
    n_clients: int = 4
    new_clients: int = 1          # whole clients held out, never trained
    scheme: str = "iid"           # iid | dirichlet | size | user (cross-device)
    alpha: float = 0.5            # Dirichlet concentration (scheme=dirichlet)

    def __post_init__(self):
        _choice("data.clients.scheme", self.scheme, {"iid", "dirichlet", "size", "user"})
        _check("data.clients.n_clients", self.n_clients >= 1, "must be >= 1", self.n_clients)
        _check("data.clients.new_clients", 0 <= self.new_clients < max(self.n_clients, 1)
               or self.scheme == "user", "must be >= 0 and leave at least one training client",
               self.new_clients)
        _check("data.clients.alpha", self.alpha > 0, "must be > 0", self.alpha)


@dataclass
class SourceConfig:
    """One real data source; ``path: null`` means the copy installed from the package index."""

    kind: str = "filmtrust"       # a key of fedmeta.data.loaders.LOADERS, or a packaged name
    path: str | None = None
    domain: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = "synthetic"     # synthetic | real
    seed: int = 0
    synthetic: dict[str, Any] = field(default_factory=dict)   # fields of SyntheticConfig
    real: list[SourceConfig] = field(default_factory=list)
    clients: list[DomainClients] = field(default_factory=lambda: [
        DomainClients("ecommerce", 5, 1), DomainClients("social", 5, 1)])
    cold_fraction: float = 0.2    # users held out inside each client as cold-start users
    max_len: int = 50             # most recent interactions kept per user
    min_interactions: int = 2     # users with fewer are dropped (logged)
    support_fraction: float = 0.5  # temporal support/query split of training tasks
    k_shot: int = 5               # support size for cold-start / new-client evaluation
    n_test: int = 2               # last interactions of warm users held out for evaluation
    max_eval_users: int = 0       # 0 = all; caps evaluation cost on big data

    def __post_init__(self):
        _choice("data.source", self.source, {"synthetic", "real"})
        _check("data.cold_fraction", 0 <= self.cold_fraction < 1, "must be in [0, 1)",
               self.cold_fraction)
        _check("data.max_len", self.max_len >= 4, "must be >= 4", self.max_len)
        _check("data.support_fraction", 0 < self.support_fraction < 1, "must be in (0, 1)",
               self.support_fraction)
        _check("data.k_shot", self.k_shot >= 1, "must be >= 1", self.k_shot)
        _check("data.n_test", self.n_test >= 1, "must be >= 1", self.n_test)
        _check("data.min_interactions", self.min_interactions >= 2, "must be >= 2",
               self.min_interactions)
        if self.source == "real" and not self.real:
            raise ConfigError("data.real: source=real needs at least one entry")
        if not self.clients:
            raise ConfigError("data.clients: at least one domain needed")


@dataclass(frozen=True)
class ModelSize:
    """A named transformer shape (``model.size``)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int          # feature vocabulary (hashed attribute/text tokens)


MODEL_SIZES = {
    "tiny": ModelSize(hidden=64, layers=2, heads=2, intermediate=128, vocab=4096),
    "small": ModelSize(hidden=256, layers=4, heads=4, intermediate=1024, vocab=16384),
    "base": ModelSize(hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522),
    "large": ModelSize(hidden=1024, layers=24, heads=16, intermediate=4096, vocab=30522),
    # initialised from all-MiniLM-L6-v2
    "minilm": ModelSize(hidden=384, layers=6, heads=12, intermediate=1536, vocab=30522),
}


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class ModelConfig:
    size: str = "tiny"
    max_tokens_per_item: int = 12
    dropout: float = 0.0
    pretrained: str = "none"      # none | minilm (item text embeddings + backbone)
    lora: LoraConfig = field(default_factory=LoraConfig)
    private_item_embeddings: bool = False   # per-client item-ID table, never leaves the client
    # full: softmax over the whole domain catalogue where it fits (up to 2048 items or
    # algorithm.negatives, else sampled, log-Q corrected); sampled: always sampled
    loss: str = "full"
    # shared: a learned ID row per catalogue item of every domain (a meta-parameter, sized by
    # build_model(item_rows=...)), summed with the attribute/text encoding; none: features only
    item_ids: str = "shared"

    def __post_init__(self):
        _choice("model.size", self.size, set(MODEL_SIZES))
        _choice("model.pretrained", self.pretrained, {"none", "minilm"})
        _choice("model.loss", self.loss, {"full", "sampled"})
        _choice("model.item_ids", self.item_ids, {"none", "shared"})
        if self.pretrained == "minilm" and self.size != "minilm":
            raise ConfigError("model.pretrained: 'minilm' needs model.size='minilm' "
                              f"(got {self.size!r})")
        _check("model.dropout", 0 <= self.dropout < 1, "must be in [0, 1)", self.dropout)
        _check("model.max_tokens_per_item", self.max_tokens_per_item >= 1, "must be >= 1",
               self.max_tokens_per_item)


@dataclass
class AlgorithmConfig:
    """Keys every algorithm has; an algorithm with more subclasses this and names its class
    in its ``Config`` attribute (see :mod:`fedmeta.algorithms.registry`)."""

    name: str = "fomaml"
    inner_steps: int = 3          # k adaptation steps on a user's support set
    inner_lr: float = 0.02        # alpha (plain SGD; 0.1 already overshoots on the tiny model)
    local_steps: int = 10         # client-side outer steps per round
    local_lr: float = 0.01        # client-side outer rate
    local_optimizer: str = "adam"  # sgd | adam (fresh each round; applied to the privatised direction)
    users_per_step: int = 32      # tasks per client step (expected batch under DP)
    negatives: int = 1024         # per user, when the training loss samples (model.loss)
    server_optimizer: str = "sgd"  # sgd | adam
    server_lr: float = 1.0        # beta
    finetune_steps: int = -1      # evaluation adaptation steps; -1 = inner_steps

    def __post_init__(self):
        _choice("algorithm.server_optimizer", self.server_optimizer, {"sgd", "adam"})
        _choice("algorithm.local_optimizer", self.local_optimizer, {"sgd", "adam"})
        for key in ("inner_lr", "local_lr", "server_lr"):
            _check(f"algorithm.{key}", getattr(self, key) > 0, "must be > 0", getattr(self, key))
        for key in ("local_steps", "users_per_step", "negatives"):
            _check(f"algorithm.{key}", getattr(self, key) >= 1, "must be >= 1", getattr(self, key))
        _check("algorithm.inner_steps", self.inner_steps >= 0, "must be >= 0", self.inner_steps)

    @property
    def eval_steps(self) -> int:
        return self.inner_steps if self.finetune_steps < 0 else self.finetune_steps


@dataclass
class LocalDPConfig:
    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None    # default: 1 / (10 * the node's own training users)
    max_grad_norm: float = 1.0
    mechanism: str = "rdp"        # rdp | prv
    grad_sample_mode: str = "functorch"   # functorch | hooks | ghost (hooks/ghost: FedAvg only)
    secure_mode: bool = False     # Opacus secure_mode noise (floating-point attack mitigation)
    # The node's declared (public) number of training users: sets q = users_per_step / population,
    # the default delta and the divisor of the noisy sum, so no released value depends on the
    # silo's real size. null: the real count (the simulation engine declares it per node).
    population: int | None = None
    # Reproducible noise and sampling, for simulations only: seeds come from HMAC(secret, ...)
    # instead of the OS CSPRNG, so the run is NOT private against anyone who knows the secret
    # (outputs say so). Never derived from the run seed or anything the server sends.
    reproducible_secret: str | None = None

    def __post_init__(self):
        _choice("privacy.local.mechanism", self.mechanism, {"rdp", "prv"})
        _choice("privacy.local.grad_sample_mode", self.grad_sample_mode,
                {"functorch", "hooks", "ghost"})
        _check("privacy.local.max_grad_norm", self.max_grad_norm > 0, "must be > 0",
               self.max_grad_norm)
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("privacy.local: set exactly one of noise_multiplier or "
                              "target_epsilon when enabled")
        if self.noise_multiplier is not None:
            _check("privacy.local.noise_multiplier", self.noise_multiplier >= 0, "must be >= 0",
                   self.noise_multiplier)
        if self.target_epsilon is not None:
            _check("privacy.local.target_epsilon", self.target_epsilon > 0, "must be > 0",
                   self.target_epsilon)
        if self.delta is not None:
            _check("privacy.local.delta", 0 < self.delta < 1, "must be in (0, 1)", self.delta)
        if self.population is not None:
            _check("privacy.local.population", self.population >= 1, "must be >= 1",
                   self.population)
        if self.reproducible_secret:
            _check("privacy.local.reproducible_secret", len(self.reproducible_secret) >= 16,
                   "needs at least 16 characters", "<hidden>")


@dataclass
class CentralDPConfig:
    enabled: bool = False
    side: str = "server"          # server | client (where clipping happens)
    clipping: str = "fixed"       # fixed | adaptive
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _choice("privacy.central.side", self.side, {"server"})
        if self.clipping == "adaptive":
            raise ConfigError("privacy.central.clipping: 'adaptive' is refused: its clipping-norm "
                              "quantile is itself a release that must be noised and accounted, "
                              "which this mechanism does not do; use 'fixed'")
        _choice("privacy.central.clipping", self.clipping, {"fixed"})
        _check("privacy.central.noise_multiplier", self.noise_multiplier >= 0, "must be >= 0",
               self.noise_multiplier)
        _check("privacy.central.clipping_norm", self.clipping_norm > 0, "must be > 0",
               self.clipping_norm)
        _check("privacy.central.delta", 0 < self.delta < 1, "must be in (0, 1)", self.delta)


@dataclass
class PrivacyConfig:
    local: LocalDPConfig = field(default_factory=LocalDPConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)


@dataclass
class RuntimeConfig:
    kind: str = "inprocess"       # inprocess | simulation | deployment
    rounds: int = 10
    fraction_train: float = 1.0   # share of training clients sampled per round
    eval_every: int = 0           # 0 = only after the last round
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    num_cpus: float = 1.0         # per simulated client (Ray)
    num_gpus: float = 0.0         # per simulated client, fractions allowed
    min_clients: int = 1          # rounds need at least this many valid replies
    timeout: float = 600.0        # seconds a round waits for replies
    checkpoint_every: int = 1
    resume: bool = False
    plots: bool = True
    threads: int = 0              # torch intra-op threads per process; 0 = torch's default
    client_state_dir: str = ""    # root of the simulated nodes' own disks (ledgers, private
                                  # tables); "" = <run dir>/nodes
    silo_dir: str = ""            # where the silos are written; "" = <run dir>/silos
    verbose: bool = False         # Flower/Ray INFO logs on the console
    ray_address: str = ""         # simulation on an existing Ray cluster ("host:6379"); "" = private
    # Server-side reproducibility (client sample, central-DP noise): as for
    # privacy.local.reproducible_secret, "" means the OS CSPRNG.
    reproducible_secret: str = ""

    def __post_init__(self):
        _choice("runtime.kind", self.kind, {"inprocess", "simulation", "deployment"})
        _check("runtime.rounds", self.rounds >= 1, "must be >= 1", self.rounds)
        _check("runtime.fraction_train", 0 < self.fraction_train <= 1, "must be in (0, 1]",
               self.fraction_train)
        _check("runtime.num_gpus", self.num_gpus >= 0, "must be >= 0", self.num_gpus)
        _check("runtime.num_cpus", self.num_cpus > 0, "must be > 0", self.num_cpus)
        if not (self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:")):
            raise ConfigError(f"runtime.device: {self.device!r} is not one of "
                              "['auto', 'cpu', 'cuda', 'cuda:N']")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"runtime.device: {self.device!r} but no CUDA device is "
                                  "available here (use 'auto' or 'cpu')")
        if self.reproducible_secret:
            _check("runtime.reproducible_secret", len(self.reproducible_secret) >= 16,
                   "needs at least 16 characters", "<hidden>")


@dataclass
class ExperimentConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # untyped here: each algorithm's own schema (fedmeta.algorithms.registry) validates it,
    # so keys of another algorithm are refused by name
    algorithm: Any = field(default_factory=lambda: {"name": "fomaml"})
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output_dir: str = "."

    def __post_init__(self):
        from fedmeta.algorithms.registry import algorithm_config

        self.algorithm = algorithm_config(self.algorithm)
        local = self.privacy.local
        if local.enabled and local.grad_sample_mode != "functorch" and self.algorithm.name != "fedavg":
            raise ConfigError("privacy.local.grad_sample_mode: 'hooks'/'ghost' compute per-sample "
                              "gradients at one shared parameter point, which only FedAvg has; "
                              f"use 'functorch' for {self.algorithm.name!r}")


RUN_DATA_KEYS = ("max_len", "support_fraction", "k_shot", "n_test", "max_eval_users")


def run_config(cfg: ExperimentConfig, catalogues: Any = None) -> dict:
    """The run-level training hyper-parameters server and nodes agree on (JSON-able).

    This is all a server sends besides the global arrays and the round: the model it
    aggregates, the algorithm and its schedule, how tasks are cut from a user's history,
    and the federation's catalogue sizes per domain (public, in the federation manifest:
    they fix the shape of the shared item-ID table). Nothing in it says which data a node
    reads or how private its update is.
    """
    return {"seed": cfg.seed, "rounds": cfg.runtime.rounds, "model": to_dict(cfg.model),
            "algorithm": to_dict(cfg.algorithm),
            "tasks": {k: getattr(cfg.data, k) for k in RUN_DATA_KEYS},
            "catalogues": check_catalogues(catalogues, cfg.model.item_ids)}


def check_catalogues(catalogues: Any, item_ids: str = "none") -> dict[str, int]:
    """``{domain: number of catalogue items}``, validated; required by ``model.item_ids=shared``
    (the table has one row per item of every domain, so its size is a fact of the data that
    server and nodes must agree on, not something either may guess)."""
    if catalogues is None:
        if item_ids == "shared":
            raise ConfigError("model.item_ids=shared: the federation's catalogue sizes are needed "
                              "to size the shared item-ID table (pass catalogues=...)")
        return {}
    if not isinstance(catalogues, dict):
        raise ConfigError(f"run.catalogues: expected {{domain: items}}, got {type(catalogues).__name__}")
    out = {}
    for domain, n in catalogues.items():
        if not isinstance(domain, str) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"run.catalogues.{domain}: {n!r} is not a catalogue size (int >= 0)")
        out[domain] = n
    if item_ids == "shared" and not out:
        raise ConfigError("model.item_ids=shared: the federation lists no catalogue")
    return dict(sorted(out.items()))


def run_config_diff(mine: dict, theirs: Any, prefix: str = "") -> list[str]:
    """Dotted keys where ``theirs`` differs from ``mine`` (missing and extra keys included)."""
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return [] if mine == theirs and type(mine) is type(theirs) else [prefix or "<root>"]
    out = []
    for key in sorted(set(mine) | set(theirs)):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in mine:
            out.append(f"{name} (unexpected)")
        elif key not in theirs:
            out.append(f"{name} (missing)")
        else:
            out.extend(run_config_diff(mine[key], theirs[key], name))
    return out


def resolve(cfg: Any) -> ExperimentConfig:
    """Turn a Hydra/OmegaConf config (or dict) into validated dataclasses."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, ExperimentConfig):
        return cfg
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = OmegaConf.merge(schema, cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf validation errors carry the full key
        raise ConfigError(str(err).splitlines()[0] + _key_hint(err)) from err
    return obj


def _key_hint(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    return f" (key: {key})" if key else ""


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config, for summary.json and checkpoints."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
