"""The one place an algorithm is registered: its name, its config schema and its class.

An algorithm class carries ``name`` and ``Config`` (its config dataclass: the shared
:class:`~fedmeta.config.AlgorithmConfig` or a subclass with the algorithm's own keys);
:func:`register` records it. Everything else -- the Hydra config check, ``build_algorithm``,
``fedmeta-compare``'s method list -- reads this registry, so a new algorithm is one small
file plus one ``configs/algorithm/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fedmeta.config import AlgorithmConfig, ConfigError

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _load() -> dict[str, type]:
    import fedmeta.algorithms  # noqa: F401  (registers the built-in algorithms)

    return REGISTRY


def names() -> list[str]:
    return sorted(_load())


def algorithm_config(raw: Any) -> AlgorithmConfig:
    """A validated config of the named algorithm; keys it does not have are refused."""
    algorithms = _load()
    if isinstance(raw, AlgorithmConfig):
        raw = {f.name: getattr(raw, f.name) for f in fields(raw)}
    raw = dict(raw)
    name = raw.get("name", "fomaml")
    if name not in algorithms:
        raise ConfigError(f"algorithm.name: {name!r} is not one of {sorted(algorithms)}")
    schema = algorithms[name].Config
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"algorithm.{unknown[0]}: not a key of {name!r} (its keys: "
                          f"{sorted(known)})")
    return schema(**raw)
