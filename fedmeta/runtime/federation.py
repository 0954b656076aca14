"""Experiment config -> the federation's silos and node configs, built once at start-up.

Only the launcher (``fedmeta-partition``, the simulation engine, the in-process runtime)
loads the sources and cuts them into silos; nodes then read only their own silo
(:mod:`fedmeta.data.silo`) and the server only the model's initial parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedmeta.config import ConfigError, ExperimentConfig
from fedmeta.data.partition import ClientPartition, partition_domain
from fedmeta.data.schema import DataError, InteractionData, filter_min_interactions, validate
from fedmeta.data.silo import Silo, catalogue_sizes, make_silos, write_silos
from fedmeta.model.recommender import build_model, meta_parameters, shared_item_rows
from fedmeta.privacy.ledger import declared_population
from fedmeta.runtime.node import NodeConfig, build_tasks, init_budget, node_configs
from fedmeta.runtime.node import experiment_view as nc_view

log = logging.getLogger(__name__)


def load_data(cfg: ExperimentConfig) -> InteractionData:
    """Sources -> one validated multi-domain frame."""
    d = cfg.data
    if d.source == "synthetic":
        from dataclasses import fields

        from fedmeta.data.synthetic import SyntheticConfig, generate

        known = {f.name for f in fields(SyntheticConfig)}
        unknown = sorted(set(d.synthetic) - known)
        if unknown:
            raise ConfigError(f"data.synthetic: unknown key(s) {unknown}; valid: {sorted(known)}")
        data = generate(SyntheticConfig(**{"seed": d.seed, **d.synthetic}))
        source = "synthetic"
    else:
        from fedmeta.data.loaders import load_source
        from fedmeta.data.packaged import load_packaged

        parts = []
        for i, src in enumerate(d.real):
            kwargs = dict(src.options)
            if src.domain:
                kwargs["domain"] = src.domain
            try:
                part = (load_packaged(src.kind, **kwargs) if src.path is None
                        else load_source(src.kind, path=src.path, **kwargs))
            except TypeError as err:
                raise DataError(f"data.real[{i}].options: {err}") from err
            parts.append(part)
        data = InteractionData.concat(parts)
        source = "+".join(s.kind for s in d.real)
    data = validate(data, source)
    return filter_min_interactions(data, d.min_interactions, source)


def partitions(cfg: ExperimentConfig, data: InteractionData) -> list[ClientPartition]:
    out = []
    known = data.domains
    for spec in cfg.data.clients:
        if spec.domain not in known:
            raise DataError(f"data.clients: domain {spec.domain!r} is not in the data "
                            f"(domains found: {known})")
        users = data.interactions.loc[data.interactions["domain"] == spec.domain, "user"]
        users = sorted(users.unique().tolist())
        labels = None
        if spec.scheme == "dirichlet":
            labels = _dominant_attribute(data.domain(spec.domain))
        out.extend(partition_domain(users, spec.domain, spec.n_clients, scheme=spec.scheme,
                                    alpha=spec.alpha, labels=labels,
                                    cold_fraction=cfg.data.cold_fraction,
                                    new_clients=spec.new_clients, seed=cfg.data.seed))
    return out


def _dominant_attribute(data: InteractionData):
    """A per-user label for Dirichlet skew: the user's most frequent first-attribute value."""
    cols = data.attribute_columns
    if not cols:
        raise DataError("data.clients.scheme=dirichlet needs an item attribute to skew on, "
                        f"but domain {data.domains} has none")
    attr = data.items.set_index("item")[cols[0]].astype(str).str.split("/").str[0]
    lab = data.interactions.assign(label=data.interactions["item"].map(attr))
    return lab.groupby("user")["label"].agg(lambda s: s.value_counts().index[0])


def build_silos(cfg: ExperimentConfig, data: InteractionData | None = None) -> list[Silo]:
    """Sources -> frames -> one silo per client, in federation order."""
    data = data if data is not None else load_data(cfg)
    return make_silos(data, partitions(cfg, data))


def initial_parameters(cfg: ExperimentConfig, device: torch.device | None = None,
                       catalogues: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The seeded initial meta-parameters: built from the run config and the federation's
    public catalogue sizes (they size the shared item-ID table), no user data."""
    model = build_model(cfg.model, cfg.data.max_len, seed=cfg.seed,
                        item_rows=shared_item_rows(cfg.model, catalogues))
    return {k: v.detach().clone().to(device or "cpu") for k, v in meta_parameters(model).items()}


def prepare_nodes(cfg: ExperimentConfig, silos: list[Silo], silo_root: str | Path,
                  state_root: str | Path, fresh: bool, write: bool = True) -> list[NodeConfig]:
    """Write every silo and derive every node's own config, once, at start-up.

    ``fresh``: a new experiment, so each DP node's privacy budget is created; a resumed one
    keeps the budgets its nodes' ledgers hold (and a node whose ledger is gone refuses)."""
    if write:
        write_silos(silos, silo_root)
    configs = node_configs(cfg, [s.client_id for s in silos], silo_root, state_root,
                           catalogue_sizes(silos))
    if cfg.privacy.local.enabled and cfg.privacy.local.population is None:
        # the engine plays every node's operator: it declares each silo's population once, in
        # the node's own file (rounded up on the 1-2-5 series), so nodes never derive released
        # values from their data
        for nc, silo in zip(configs, silos):
            nc.privacy.population = declared_population(
                max(1, len(build_tasks(nc_view(nc), silo, nc.run["catalogues"]).train)))
    if fresh and cfg.privacy.local.enabled:
        for nc, silo in zip(configs, silos):
            init_budget(nc, silo, reset=Path(nc.state_dir).exists())
    return configs
