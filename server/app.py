"""The Flower ``ServerApp``: fedmeta's round driver over Flower's ``Grid``.

Only translation lives here: the experiment comes from ``run_config``, the loop is
:class:`fedmeta.runtime.driver.RoundDriver` (the same one the in-process runtime runs), and
:class:`server.transport.FlowerTransport` turns its calls into messages. The server holds
no user data: it builds the seeded initial model from the config and reads the federation
manifest (client ids and domains) to know which SuperNodes to expect.

``run_config`` keys (the same under ``fedmeta-simulate``, ``fedmeta-deploy`` and ``flwr run``):

* ``experiment``: the resolved experiment config as JSON (what the launchers pass), or
  ``overrides``: Hydra overrides as one shell-quoted string, composed from ``configs/``;
* ``federation``: the directory of ``federation.json`` (written with the silos by
  ``fedmeta-partition``); default: ``runtime.silo_dir``;
* ``output-dir``: where outputs go (default ``outputs/flwr/<date>/<time>``; give an
  absolute path under ``flwr run``); ``stop-after``: end after that round (tests of resume).

A run that cannot start (wrong SuperNode count, a node that refuses) raises, so Flower marks
the run failed and ``flwr run``/``fedmeta-simulate`` exit non-zero.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import ConfigError, ExperimentConfig, resolve
from fedmeta.data.silo import read_manifest
from fedmeta.runtime.driver import RoundDriver
from fedmeta.runtime.federation import initial_parameters
from fedmeta.runtime.node import resolve_device
from server.transport import FlowerTransport

log = logging.getLogger(__name__)


def experiment_from(run_config: dict) -> ExperimentConfig:
    text = str(run_config.get("experiment", "") or "")
    if text:
        try:
            return resolve(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigError(f"run_config.experiment: not valid JSON ({err})") from None
    from fedmeta.runtime.hydra_config import compose

    try:
        overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    except ValueError as err:
        raise ConfigError(f"overrides: cannot split into Hydra overrides ({err})") from None
    return compose(overrides)


def default_output_dir() -> Path:
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def run_server(grid: Grid, run_config: dict, echo=print) -> dict:
    cfg = experiment_from(run_config)
    out_dir = Path(str(run_config.get("output-dir") or "")
                   or (cfg.output_dir if cfg.output_dir not in ("", ".") else default_output_dir()))
    federation = str(run_config.get("federation") or cfg.runtime.silo_dir or "")
    if not federation:
        raise ConfigError("run_config.federation: the directory of federation.json is needed "
                          "(write it with fedmeta-partition)")
    clients, catalogues = read_manifest(federation)
    stop_after = int(run_config.get("stop-after", 0) or 0) or None
    device = resolve_device(cfg.runtime.device)
    log.info("fedmeta ServerApp: %d clients, outputs in %s", len(clients), out_dir.resolve())
    driver = RoundDriver(cfg, FlowerTransport(grid, clients, cfg.runtime.timeout), out_dir,
                         initial_parameters(cfg, device, catalogues), catalogues, echo=echo)
    return driver.run(stop_after)


def echo_line(line: str) -> None:
    """A progress line on the console and in every log *file* of the process (Hydra's
    ``simulate.log``), without a second, prefixed copy on the console."""
    print(line, flush=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("fedmeta.progress", logging.INFO, __file__, 0, line,
                                           None, None))


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """A ServerApp with ``run_config`` defaults (for launchers that pass none)."""
    defaults = dict(run_config or {})
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        given = {k: v for k, v in dict(context.run_config).items() if v not in ("", None)}
        run_server(grid, {**defaults, **given}, echo=echo_line)

    return server_app


app = make_server_app()
