"""Hydra plumbing shared by every command: where ``configs/`` is, the registered schema, and
composing a validated :class:`ExperimentConfig` from overrides (for tools that are not Hydra
mains themselves, such as the comparison and privacy commands)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

from fedmeta.config import ConfigError, ExperimentConfig, resolve

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=ExperimentConfig)


def config_dir() -> str:
    if not (CONFIG_DIR / "config.yaml").exists():
        raise ConfigError(f"configs/ not found at {CONFIG_DIR}: install the project in editable "
                          "mode from its checkout (pip install -e .)")
    return str(CONFIG_DIR)


def compose(overrides: list[str] | None = None) -> ExperimentConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        inner = err.__cause__ if err.__cause__ is not None else err
        key = getattr(inner, "full_key", None)
        why = str(inner).splitlines()[0]
        raise ConfigError(f"{key}: {why}" if key else str(err)) from err
    return resolve(raw)
