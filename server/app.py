"""The Flower ``ServerApp``: fedmeta's round loop with messages instead of function calls.

It needs two things, both from ``run_config`` so it runs the same under ``run_simulation``,
``flwr run`` and real SuperLinks: ``overrides`` (Hydra overrides as one shell-quoted string;
the experiment is composed from ``configs/`` exactly as ``fedmeta-simulate`` does) and
``output-dir`` (empty: the config's ``output_dir`` if set, else ``outputs/flwr/<date>/<time>``
under the ServerApp's working directory -- give an absolute path under ``flwr run``). An
optional ``stop-after`` round ends the run early after its checkpoint (to exercise resume).

The loop mirrors :func:`fedmeta.runtime.inprocess.run` step for step -- same client
selection, same server step, same evaluation rounds, checkpoints and outputs -- so both
runtimes give the same metrics for the same seed; Flower is only the transport. The
server never loads client data: it builds the (seeded) model for the initial
meta-parameters and learns who the clients are by asking the nodes (a ``query`` message:
client id, domain, new-client flag). Nodes that appear later (a restarted SuperNode gets a
new node id) are asked at the start of each round. Client states (DP accountants) come back
in every training reply, go into the checkpoint, and are sent with each training message, so
a node whose ``Context.state`` was lost continues from the server's copy.

``flwr run .`` from the repository root uses the ``[tool.flwr.app]`` section of
pyproject.toml and needs one SuperNode per federation client::

    export PATH=/path/to/venv/bin:$PATH            # the SuperLink spawns flower-superexec by name
    export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # else it tries to install torch & co
    export FLWR_HOME=/some/dir FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1  # optional
    flwr run . --stream --federation-config 'num-supernodes=10' \
        --run-config 'overrides="runtime.rounds=2" output-dir="/abs/out"'

The local SuperLink it starts keeps running afterwards: stop it by its PID
(``pgrep -f flower-superlink``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import ConfigError, ExperimentConfig
from fedmeta.model.recommender import build_model, meta_parameters
from fedmeta.runtime import checkpoint
from fedmeta.runtime.federation import resolve_device
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.inprocess import is_eval_round
from fedmeta.runtime.results import Recorder, progress_line, write_outputs
from fedmeta.runtime.server import MetaServer
from server.codec import CONFIG, META, to_array_record
from server.strategy import OVERRIDES, ClientInfo, Directory, MetaStrategy, participation

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def parse_overrides(text: str) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise ConfigError(f"overrides: cannot split {text!r} into Hydra overrides ({err})") from err


def compose_config(overrides: list[str]) -> ExperimentConfig:
    """:func:`compose`, also from inside a running Hydra job (``fedmeta-simulate`` runs the
    ServerApp in a thread of its own job): Hydra's global state -- the initialised instance,
    the job's HydraConfig and its runtime name -- is put back afterwards, or the next job of
    a ``-m`` sweep would inherit the composed one."""
    import copy

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobRuntime

    live = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if live is None:
        return compose(overrides)
    job_cfg = HydraConfig.instance().cfg
    runtime = copy.deepcopy(JobRuntime.instance().conf)
    GlobalHydra.instance().clear()
    try:
        return compose(overrides)
    finally:
        GlobalHydra.instance().clear()
        GlobalHydra.instance().initialize(live)
        HydraConfig.instance().cfg = job_cfg
        JobRuntime.instance().conf = runtime


def default_output_dir() -> Path:
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def connect(grid: Grid, overrides: list[str], timeout: float,
            directory: Directory | None = None, wait: bool = True) -> Directory:
    """Ask every not-yet-known node which client it serves, until all clients are known."""
    directory = directory or Directory()
    payload = json.dumps(list(overrides))
    deadline = time.time() + timeout
    while True:
        known = set(directory.node_of.values())
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            msgs = [Message(RecordDict({CONFIG: ConfigRecord({OVERRIDES: payload})}),
                            dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=timeout):
                try:
                    _register(directory, reply)
                except RuntimeError as err:
                    if wait:            # at start-up a misconfigured node is fatal
                        raise
                    log.warning("ignoring node %s: %s", reply.metadata.src_node_id, err)
        if directory.complete or not wait:
            return directory
        if time.time() > deadline:
            have = sorted(directory.node_of)
            raise RuntimeError(f"only {len(have)} of {directory.num_clients or '?'} federation "
                               f"clients have a node after {timeout:.0f}s (have {have}); start one "
                               "SuperNode per client (partition-id 0..N-1)")
        time.sleep(POLL_SECONDS)


def _register(directory: Directory, reply: Message) -> None:
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise RuntimeError(f"node {node} could not join the federation: {reply.error.reason}")
    info = reply.content[META]
    cid, total = str(info["client-id"]), int(info["num-clients"])
    parts = int(info.get("num-partitions", -1))
    if directory.num_clients not in (None, total):
        raise RuntimeError(f"node {node} reports {total} federation clients, others "
                           f"{directory.num_clients}: nodes run different configurations")
    if parts not in (-1, total):
        raise RuntimeError(f"the federation has {total} clients but the runtime started "
                           f"{parts} SuperNodes; one node per client is needed (e.g. flwr run "
                           f"--federation-config 'num-supernodes={total}')")
    old = directory.node_of.get(cid)
    if old is not None and old != node:
        log.warning("client %s moved from node %s to node %s", cid, old, node)
    directory.num_clients = total
    directory.node_of[cid] = node
    directory.clients[cid] = ClientInfo(cid, str(info["domain"]), bool(info["new-client"]),
                                        int(info["partition-id"]))


def initial_parameters(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    device = resolve_device(cfg.runtime.device)
    model = build_model(cfg.model, cfg.data.max_len, seed=cfg.seed).to(device)
    return {k: v.to(device) for k, v in meta_parameters(model).items()}


def run_server(grid: Grid, run_config: dict, echo=print) -> dict:
    """Run the experiment named by ``run_config``; returns the summary (or where it stopped)."""
    overrides = parse_overrides(str(run_config.get("overrides", "")))
    cfg = compose_config(overrides)
    out_dir = Path(str(run_config.get("output-dir") or "")
                   or (cfg.output_dir if cfg.output_dir not in ("", ".") else default_output_dir()))
    stop_after = int(run_config.get("stop-after", 0) or 0) or None
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("fedmeta ServerApp: outputs in %s, overrides %s", out_dir.resolve(), overrides)

    server = MetaServer(cfg, initial_parameters(cfg))
    recorder, states, state_rounds, start = Recorder(), {}, {}, 1
    ckpt_dir = out_dir / "checkpoint"
    if cfg.runtime.resume and checkpoint.exists(ckpt_dir):
        ck = checkpoint.load(ckpt_dir)
        server.optimizer.load_state_dict({k: v.to(server.optimizer.params[k].device)
                                          for k, v in ck["params"].items()}, ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        states, recorder.rows, recorder.rounds = ck["client_states"], ck["rows"], ck["rounds"]
        state_rounds = {cid: ck["round"] for cid in states}
        start = ck["round"] + 1
        echo(f"resuming from round {ck['round']} ({ckpt_dir})")

    directory = connect(grid, overrides, cfg.runtime.timeout)
    history = [r["central_dp"] for r in recorder.rounds if r.get("central_dp")]
    hints = {"fedmeta.run-key": hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]}
    if cfg.runtime.kind == "simulation":   # simulated nodes share this machine's disk
        hints["fedmeta.state-dir"] = str((out_dir / "client_state").resolve())
    strategy = MetaStrategy(cfg, overrides, server, directory, states, state_rounds, history,
                            hints)
    strategy.summary()
    for rnd in range(start, cfg.runtime.rounds + 1):
        t0 = time.time()
        connect(grid, overrides, cfg.runtime.timeout, directory, wait=False)
        msgs = list(strategy.configure_train(rnd, to_array_record(server.params), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(msgs, timeout=cfg.runtime.timeout))
        strategy.aggregate_train(rnd, replies)
        rl = strategy.log
        for cid in rl.sampled:
            if cid in rl.train:
                recorder.train_rows(rnd, cid, *rl.train[cid])
        if rl.central is not None:
            recorder.train_rows(rnd, "server", "all", {"central_epsilon": rl.central["epsilon"]})
        if is_eval_round(cfg, rnd):
            msgs = list(strategy.configure_evaluate(rnd, to_array_record(server.params),
                                                    ConfigRecord(), grid))
            strategy.aggregate_evaluate(rnd, grid.send_and_receive(msgs, timeout=cfg.runtime.timeout))
            recorder.eval_rows(rl.eval_rows)
        seconds = time.time() - t0
        info = {"round": rnd, "seconds": seconds, "bytes_sent": rl.bytes_sent,
                "bytes_sent_eval": rl.bytes_sent_eval, "bytes_received": rl.bytes_received,
                "clients": len(rl.sampled), "accepted": rl.outcome.accepted,
                "failures": rl.failures, "eval_failures": rl.eval_failures}
        if rl.central is not None:
            info["central_dp"] = rl.central
        recorder.rounds.append(info)
        line = progress_line(rnd, cfg.runtime.rounds, seconds, recorder.frame(),
                             len(rl.outcome.accepted), len(rl.failures))
        echo(line + (f" | central-eps {rl.central['epsilon']:.3f}" if rl.central else ""))
        if rnd % cfg.runtime.checkpoint_every == 0 or rnd == cfg.runtime.rounds:
            checkpoint.save(ckpt_dir, rnd, server.params, server.optimizer.state_dict(),
                            strategy.states, recorder.rows, recorder.rounds, cfg)
        if stop_after is not None and rnd >= stop_after:
            return {"stopped_at": rnd}
    extra = {"runtime": "flower"}
    if strategy.central is not None:
        central = strategy.central
        extra["central_dp"] = {
            "epsilon": central.epsilon, "delta": cfg.privacy.central.delta,
            "accountant": "flower-dp-wrapper" if central.in_wrapper else "flower-rdp-direct",
            "client_epsilon": {cid: central.epsilon_after(n)
                               for cid, n in sorted(participation(recorder.rounds).items())}}
    return write_outputs(out_dir, cfg, recorder, strategy.states, extra)


def _echo(line: str) -> None:
    print(line, flush=True)


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """A ServerApp with ``run_config`` defaults (``run_simulation`` passes no run config)."""
    defaults = dict(run_config or {})
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        given = {k: v for k, v in dict(context.run_config).items() if v not in ("", None)}
        run_server(grid, {**defaults, **given}, echo=_echo)

    return server_app


app = make_server_app()

