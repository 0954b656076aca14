"""``fedmeta-simulate``: a Hydra main over ``configs/`` that runs one experiment per job.

``runtime.kind=simulation`` (the default) runs the Flower ServerApp and ClientApp the way
``flwr run`` does: a SuperLink with Flower's simulation runtime (owned by this process) and
``flwr run`` of this app, one virtual SuperNode per federation client (training and held-out
new clients alike) on Ray, each with ``runtime.num_cpus`` (whole CPUs) / ``runtime.num_gpus``
(fractions allowed); clients use CUDA when Ray gives them a GPU; ``runtime.ray_address`` runs
on an existing Ray cluster. At start-up the engine cuts the silos and writes one node file
per virtual SuperNode (``FEDMETA_NODES_DIR``); it never sends them. ``runtime.kind=inprocess``
runs the plain reference loop with as many torch threads as one simulated client gets
(``runtime.num_cpus``, which Ray passes to its actors as ``OMP_NUM_THREADS``): torch's sums
depend on the thread count, and with a matching count both runtimes give identical metrics
for the same config and seed. Outputs go to the Hydra run directory (``-m`` sweeps: one
sub-directory per job).

The config is resolved and checked first: an invalid value exits with status 2 and a
one-line message naming the key, before data is loaded or Ray starts; a run that fails (a
refused node, a wrong SuperNode count) exits 1. The ServerApp receives the resolved config as
JSON in its run config; nodes receive only their node files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from fedmeta.config import ConfigError, ExperimentConfig, resolve
from fedmeta.data.schema import DataError
from fedmeta.runtime.hydra_config import config_dir, register
from server.supervisor import Interrupted

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _fail(err: Exception) -> None:
    print(f"fedmeta-simulate: {err}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG)


def check_resources(cfg: ExperimentConfig) -> dict:
    """Ray client resources; requests Ray could never grant fail here instead of hanging."""
    cpus = os.cpu_count() or 1
    if cfg.runtime.num_cpus != int(cfg.runtime.num_cpus):
        raise ConfigError(f"runtime.num_cpus: {cfg.runtime.num_cpus} is not a whole number (Flower's "
                          "simulation gives each virtual SuperNode whole CPUs)")
    if cfg.runtime.num_cpus > cpus and not cfg.runtime.ray_address:
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
    """Flower's current simulation path: a SuperLink with the simulation runtime that this
    process owns (so its environment reaches every Ray worker and nothing outlives the run),
    and ``flwr run`` of this app with one virtual SuperNode per node file."""
    from fedmeta.config import to_dict
    from server.deploy import REPO_ROOT, Deployment
    from wire import NODES_DIR_ENV

    resources = resources or check_resources(cfg)
    silo_root, nodes_dir = prepare(cfg, out_dir)
    n = len(list(nodes_dir.glob("node-*.json")))
    verbose, rt = cfg.runtime.verbose, cfg.runtime
    env = {NODES_DIR_ENV: str(nodes_dir.resolve()),
           # a private Ray instance unless a cluster is named: never a stray head on the machine
           "RAY_ADDRESS": rt.ray_address or "local",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",     # keeps Ray on loopback addresses
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           "FLWR_LOG_LEVEL": "INFO" if verbose else "ERROR", "RAY_DEDUP_LOGS": "1"}
    federation = {"num-supernodes": n, "client-resources-num-cpus": int(resources["num_cpus"]),
                  "client-resources-num-gpus": float(resources["num_gpus"])}
    if not rt.ray_address:
        federation["init-args-num-cpus"] = os.cpu_count() or 1
    if not verbose:
        federation.update({"init-args-logging-level": "ERROR", "init-args-log-to-driver": False})
    run_config = {"experiment": json.dumps(to_dict(cfg)), "output-dir": str(out_dir.resolve()),
                  "federation": str(silo_root.resolve())}
    log.info("Flower simulation: %d virtual SuperNodes, %s each, outputs in %s", n, resources,
             out_dir)
    from server.app import echo_line

    from server.supervisor import Supervisor

    sup = Supervisor(out_dir / "flower" / "logs", None, grace=5.0)
    with Deployment(out_dir / "flower", sup, insecure=True, echo=_relay(echo_line, verbose),
                    extra_env=env, timeout=120.0) as dep:
        sup.env = dep.env
        dep.start_superlink(simulation=True)
        dep.submit(REPO_ROOT, run_config, federation_config=federation)
    if not (out_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {out_dir / 'summary.json'}; "
                           f"see {out_dir / 'flower' / 'logs'}")


_CHATTER = re.compile(r"^(\S+ \S+:(DEBUG|INFO):|(INFO|DEBUG)\s*:|SuperLink on |Using SuperLink|"
                      r"Loading project|Successfully|🎊)")


def _relay(echo, verbose: bool):
    """The ServerApp's lines as they come; Flower's and Ray's DEBUG/INFO chatter only with
    runtime.verbose (warnings and errors always pass)."""
    def relay(line: str) -> None:
        if verbose or not _CHATTER.match(line.strip() and line or "x"):
            if line.strip():
                echo(line)
    return relay


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
    if cfg.runtime.verbose:
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.INFO)
    try:
        if cfg.runtime.kind == "inprocess":
            import torch

            from fedmeta.runtime.inprocess import run

            from server.app import echo_line

            torch.set_num_threads(max(1, int(cfg.runtime.num_cpus)))
            run(cfg, out_dir, echo=echo_line)
        else:
            from server.supervisor import raise_on_signals

            with raise_on_signals():        # Ctrl-C: stop the SuperLink, Ray and all, then exit
                simulate(cfg, out_dir, resources)
    except (ConfigError, DataError) as err:
        _fail(err)
    except Interrupted as err:
        print(f"fedmeta-simulate: {err}: every Flower and Ray process stopped", file=sys.stderr,
              flush=True)
        sys.exit(128 + err.signum)
    except Exception as err:       # the run failed (a refused node, a crashed ServerApp...)
        from server.deploy import DeployError

        if not isinstance(err, (DeployError, RuntimeError)):
            raise
        print(f"fedmeta-simulate: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


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
