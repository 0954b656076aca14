"""``fedmeta-simulate``: a Hydra main over ``configs/`` that runs one experiment per job.

``runtime.kind=simulation`` (the default) runs the Flower ServerApp and ClientApp under
Flower's simulation runtime with the Ray backend, one virtual SuperNode per federation client
(training and held-out new clients alike), each with ``runtime.num_cpus`` / ``runtime.num_gpus``
(fractions allowed); clients use CUDA when Ray gives them a GPU. ``runtime.kind=inprocess``
runs the plain reference loop with as many torch threads as one simulated client gets
(``runtime.num_cpus``, which Ray passes to its actors as ``OMP_NUM_THREADS``): torch's sums
depend on the thread count, and with a matching count both runtimes give identical metrics
for the same config and seed. Outputs go to the Hydra run directory (``-m`` sweeps: one
sub-directory per job).

The config is resolved and checked first: an invalid value exits with status 2 and a
one-line message naming the key, before data is loaded or Ray starts. The Hydra overrides of
the job are what the apps receive (the ServerApp in its run config, the clients inside every
message), so every process composes the same experiment from ``configs/``.
"""

from __future__ import annotations

import logging
import os
import json
import sys
from pathlib import Path

from fedmeta.config import ConfigError, ExperimentConfig, resolve
from fedmeta.data.schema import DataError
from fedmeta.runtime.hydra_config import config_dir, register

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _fail(err: Exception) -> None:
    print(f"fedmeta-simulate: {err}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG)


def check_resources(cfg: ExperimentConfig) -> dict:
    """Ray client resources; requests Ray could never grant fail here instead of hanging."""
    cpus = os.cpu_count() or 1
    if cfg.runtime.num_cpus > cpus:
        raise ConfigError(f"runtime.num_cpus: {cfg.runtime.num_cpus} per client but this machine "
                          f"has {cpus} CPUs; no client could ever be scheduled")
    gpus = cfg.runtime.num_gpus
    if gpus > 0:
        import torch

        if not torch.cuda.is_available():
            log.warning("runtime.num_gpus=%s but no CUDA device is visible: clients run on CPU",
                        gpus)
            gpus = 0.0
        elif gpus > torch.cuda.device_count():
            raise ConfigError(f"runtime.num_gpus: {gpus} per client but only "
                              f"{torch.cuda.device_count()} GPUs are visible")
    return {"num_cpus": cfg.runtime.num_cpus, "num_gpus": float(gpus)}


def prepare(cfg: ExperimentConfig, out_dir: Path) -> tuple[Path, Path]:
    """The engine's one-time start-up: silos on disk and one node file per virtual SuperNode.

    Returns (the silo root holding federation.json, the directory of node files). A fresh
    run creates every DP node's privacy budget; a resumed one keeps the ledgers on disk."""
    from fedmeta.runtime import checkpoint
    from fedmeta.runtime.federation import build_silos, prepare_nodes

    fresh = not (cfg.runtime.resume and checkpoint.exists(out_dir / "checkpoint"))
    silo_root = Path(cfg.runtime.silo_dir or out_dir / "silos")
    state_root = Path(cfg.runtime.client_state_dir or out_dir / "nodes")
    configs = prepare_nodes(cfg, build_silos(cfg), silo_root, state_root, fresh)
    nodes_dir = out_dir / "node-configs"
    for i, nc in enumerate(configs):
        nc.save(nodes_dir / f"node-{i}.json")
    return silo_root, nodes_dir


def simulate(cfg: ExperimentConfig, out_dir: Path, resources: dict | None = None) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from clients.app import NODES_DIR_ENV
    from clients.app import app as client_app
    from fedmeta.config import to_dict
    from server.app import make_server_app
    from server.supervisor import reap_descendants

    resources = resources or check_resources(cfg)
    silo_root, nodes_dir = prepare(cfg, out_dir)
    n = len(list(nodes_dir.glob("node-*.json")))
    os.environ[NODES_DIR_ENV] = str(nodes_dir.resolve())   # inherited by Ray's workers
    log.info("Flower simulation: %d SuperNodes, %s each, outputs in %s", n, resources, out_dir)
    server_app = make_server_app({"experiment": json.dumps(to_dict(cfg)),
                                  "output-dir": str(out_dir), "federation": str(silo_root)})
    with reap_descendants():
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_name="ray", backend_config={"client_resources": resources})
    if not (out_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {out_dir / 'summary.json'}; "
                           "see the ServerApp log above")


def _job(raw) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg = resolve(raw)
        resources = check_resources(cfg) if cfg.runtime.kind == "simulation" else None
        if cfg.runtime.kind == "deployment":
            raise ConfigError("runtime.kind: 'deployment' starts real SuperLink/SuperNode "
                              "processes; use fedmeta-deploy")
    except ConfigError as err:
        _fail(err)
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        if cfg.runtime.kind == "inprocess":
            import torch

            from fedmeta.runtime.inprocess import run

            from server.app import echo_line

            torch.set_num_threads(max(1, int(cfg.runtime.num_cpus)))
            run(cfg, out_dir, echo=echo_line)
        else:
            simulate(cfg, out_dir, resources)
    except (ConfigError, DataError) as err:
        _fail(err)


def main() -> None:
    import hydra

    register()
    try:
        directory = config_dir()
    except ConfigError as err:
        _fail(err)
    hydra.main(config_path=directory, config_name="config", version_base="1.3")(_job)()


if __name__ == "__main__":
    main()
