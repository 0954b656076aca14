"""``fedmeta-deploy``: one experiment on real Flower processes on this machine.

The simulation runs every client inside one Ray cluster; this command starts what a cross-silo
federation runs instead - a SuperLink and one SuperNode per fedmeta client, talking over TLS with
registered node keys - so the network path (serialisation, authentication, per-message ClientApp
processes) is exercised exactly as it would be across hosts. The ServerApp writes the same run
directory as the simulation (metrics.csv, summary.json, plots, checkpoint).

Every process is started in its own session and stopped by this command, on success, failure,
Ctrl-C or SIGTERM alike: SuperNodes first, then the SuperLink, each by process group and by the
descendants it had, with SIGKILL after a grace period. Flower state (``FLWR_HOME``), the
SuperLink database, certificates and one log per process live in the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import queue
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence


from fedmeta.config import ConfigError, ExperimentConfig
from server import certs
from server.supervisor import Interrupted, Proc, Supervisor, raise_on_signals

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedmeta"                # SuperLink connection name in $FLWR_HOME/config.toml
OVERRIDES_KEY = "overrides"           # [tool.flwr.app.config] keys the ServerApp reads:
OUTPUT_KEY = "output-dir"             # shell-quoted Hydra overrides, and the run directory
LOOPBACK = "127.0.0.1"


class DeployError(RuntimeError):
    """A deployment step failed; the message names the process and carries its log tail."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError as err:
            raise DeployError(f"--superlink-port: {LOOPBACK}:{port} is in use ({err.strerror})") from err


def child_env(flwr_home: Path) -> dict[str, str]:
    """The venv's bin dir first on PATH (SuperLink and SuperNode spawn ``flower-superexec`` by
    name); no runtime ``uv sync`` of the app's dependencies (they are installed here); no
    telemetry; Flower state isolated in the work directory."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    return env


class Deployment:
    """One SuperLink and its SuperNodes under a :class:`Supervisor`, files in ``workdir``."""

    def __init__(self, workdir: str | Path, sup: Supervisor | None = None, *,
                 insecure: bool = False, port: int | None = None,
                 echo: Callable[[str], None] = print, timeout: float = 60.0,
                 extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.cert_dir = self.workdir / "certs"
        self.env = {**child_env(self.flwr_home), **(extra_env or {})}
        self.sup = sup or Supervisor(self.workdir / "logs", self.env)
        self.insecure = insecure
        self.port = port
        self.echo = echo
        self.timeout = timeout
        self.bin = Path(sys.executable).parent
        self.tls: certs.TlsFiles | None = None
        self.superlink: Proc | None = None
        self.supernodes: list[Proc] = []

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.sup.stop_all()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, n_nodes: int, nodes_dir: Path | None = None) -> None:
        """``nodes_dir``: node files ``node-<i>.json``; SuperNode i is given only its own."""
        self.nodes_dir = nodes_dir
        if n_nodes < 1:
            raise DeployError(f"--nodes: need at least one SuperNode, got {n_nodes}")
        self.start_superlink()
        keys = None if self.insecure else certs.ensure_node_keys(self.cert_dir, n_nodes)
        for i in range(n_nodes):
            if keys is not None:
                self.register(keys[i].public)
            self.start_supernode(i, n_nodes, keys[i].private if keys else None)
        self.wait_online(n_nodes)

    def start_superlink(self, simulation: bool = False) -> Proc:
        """``simulation``: the SuperLink runs Flower's simulation runtime (virtual SuperNodes
        on Ray) instead of waiting for real SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        _check_port_free(self.port)      # else our readiness probe would reach the other server
        database = self.workdir / "superlink.db"
        for path in (database, *database.parent.glob(database.name + "-*")):
            path.unlink(missing_ok=True)  # fresh state: no stale runs, nodes or key registrations
        argv = [str(self.bin / "flower-superlink"), "--port", str(self.port), "--host", LOOPBACK,
                "--database", str(database), "--disable-runtime-dependency-installation"]
        if simulation:
            argv.append("--simulation")
        if self.insecure:
            argv.append("--insecure")
        else:
            self.tls = certs.ensure_tls(self.cert_dir)
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
                     str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                     "--enable-supernode-auth"]
        self.write_connection()
        self.superlink = self.sup.start("superlink", argv)
        self._wait_listening(self.superlink)
        self.echo(f"SuperLink on {self.address} ({'insecure' if self.insecure else 'TLS, node authentication'})")
        return self.superlink

    def write_connection(self) -> Path:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append("insecure = true" if self.insecure
                     else f"root-certificates = {json.dumps(str(self.tls.ca_cert))}")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait_listening(self, proc: Proc) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._check_alive([proc])
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 1):
                return
            time.sleep(0.2)
        raise DeployError(f"{proc.name} not listening on {self.address} after {self.timeout:.0f} s; "
                          f"log {proc.log_path}:\n{proc.tail()}")

    def flwr(self, *args: str, timeout: float | None = None) -> str:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME; its stdout, or DeployError."""
        self._check_alive([self.superlink] if self.superlink else [])
        argv = [str(self.bin / "flwr"), *args]
        try:
            res = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                 timeout=timeout or self.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"`{' '.join(argv[1:])}` timed out") from err
        if res.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n"
                              f"{(res.stdout + res.stderr).strip()[-3000:]}")
        return res.stdout

    def flwr_json(self, *args: str) -> dict:
        out = self.flwr(*args, "--format", "json")
        try:
            return json.loads(out[out.index("{"):])
        except ValueError as err:
            raise DeployError(f"`flwr {' '.join(args)}` printed no JSON:\n{out[-2000:]}") from err

    def register(self, public_key: Path) -> str:
        res = self.flwr_json("supernode", "register", str(public_key), CONNECTION)
        return str(res.get("node-id"))

    def start_supernode(self, index: int, n_nodes: int, private_key: Path | None,
                        name: str | None = None) -> Proc:
        node_file = (getattr(self, "nodes_dir", None) or self.workdir / "nodes") / f"node-{index}.json"
        argv = [str(self.bin / "flower-supernode"), "--superlink", self.address,
                "--port", str(free_port()),
                # the node's own config: its silo, its state dir, its privacy settings
                "--node-config", f"partition-id={index} num-partitions={n_nodes} "
                                 f"fedmeta-node=\"{node_file}\""]
        if self.insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls.ca_cert)]
            if private_key is not None:
                argv += ["--auth-supernode-private-key", str(private_key)]
        proc = self.sup.start(name or f"supernode-{index}", argv)
        if name is None:
            self.supernodes.append(proc)
        return proc

    def wait_online(self, n_nodes: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self._check_alive()
            nodes = self.flwr_json("supernode", "list", CONNECTION).get("nodes", [])
            online = sum(n.get("status") == "online" for n in nodes)
            if online >= n_nodes:
                self.echo(f"{online} SuperNodes online")
                return
            if time.monotonic() > deadline:
                raise DeployError(f"only {online} of {n_nodes} SuperNodes online after "
                                  f"{self.timeout:.0f} s; logs in {self.sup.log_dir}")
            time.sleep(1.0)

    def _check_alive(self, procs: Sequence[Proc] | None = None) -> None:
        for p in procs if procs is not None else [self.superlink, *self.supernodes]:
            if p is not None and not p.alive():
                raise DeployError(f"{p.name} exited with code {p.popen.returncode}; "
                                  f"log {p.log_path}:\n{p.tail()}")

    def submit(self, app_dir: str | Path, run_config: dict, timeout: float | None = None,
               federation_config: dict | None = None) -> str:
        """``flwr run --stream``: relay the ServerApp's log; return the run id once the run
        finished and the SuperLink reports it completed (``flwr run`` itself exits 0 for a
        failed run, so the status is asked for separately)."""
        cfg_path = self.workdir / "run-config.toml"
        cfg_path.write_text("".join(f"{k} = {json.dumps(v, ensure_ascii=False)}\n"
                                    for k, v in run_config.items()))
        argv = [str(self.bin / "flwr"), "run", str(app_dir), CONNECTION, "--stream",
                "--run-config", str(cfg_path)]
        if federation_config:
            argv += ["--federation-config", " ".join(
                f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                for k, v in federation_config.items())]
        run = self.sup.start("flwr-run", argv, pipe=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(run.popen.stdout, lines), daemon=True).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        run_id = None
        with open(run.log_path, "a", encoding="utf-8") as log_fh:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    log_fh.write(line)
                    log_fh.flush()
                    self.echo(line.rstrip("\n"))
                    found = re.search(r"started run (\d+)", line)
                    run_id = found.group(1) if found and run_id is None else run_id
                self.sup.refresh()
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise DeployError(f"run did not finish within {timeout:.0f} s")
        code = run.popen.wait()
        if code != 0 or run_id is None:
            raise DeployError(f"`flwr run` failed (exit {code}); log {run.log_path}:\n{run.tail()}")
        status = self.run_status(run_id)
        if status.get("status") != "finished:completed":
            raise DeployError(f"run {run_id} ended as {status.get('status')!r} "
                              f"({status.get('status-details')}); ServerApp log {run.log_path}:\n"
                              f"{run.tail()}")
        return run_id

    def run_status(self, run_id: str) -> dict:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return runs[0] if runs else {}


def _pump(stream, lines: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            lines.put(raw.decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        pass
    finally:
        lines.put(None)


# ----------------------------------------------------------------------------- config and CLI

def run_dir_for(overrides: Sequence[str], now: datetime.datetime | None = None) -> tuple[list[str], Path]:
    """Hydra-style run directory (``outputs/<date>/<time>`` unless ``hydra.run.dir=`` or
    ``output_dir=`` is given), made absolute because the ServerApp runs in another process
    and directory; the returned overrides carry it as ``output_dir``."""
    rest, run_dir = [], None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "hydra.run.dir":
            run_dir = Path(value)
        elif key.lstrip("+~") == "output_dir":
            run_dir = Path(value)
        else:
            rest.append(o)
    if run_dir is None:
        now = now or datetime.datetime.now()
        run_dir = Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    run_dir = run_dir.resolve()
    return [*rest, f"output_dir={run_dir}"], run_dir


def deployment_overrides(overrides: Sequence[str]) -> list[str]:
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "runtime" and value != "deployment":
            raise ConfigError(f"runtime: fedmeta-deploy runs runtime=deployment, got {value!r}")
    return ["runtime=deployment", *(o for o in overrides if o.partition("=")[0] != "runtime")]


def app_run_config(app_dir: str | Path, overrides: Sequence[str], run_dir: Path,
                   federation: Path | None = None) -> dict:
    """The run config for the app: only keys its pyproject declares (``flwr run`` rejects
    others), and the overrides key is required - without it the ServerApp would silently run
    the default experiment."""
    import tomllib

    path = Path(app_dir) / "pyproject.toml"
    try:
        declared = tomllib.loads(path.read_text())["tool"]["flwr"]["app"].get("config", {})
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise DeployError(f"{path}: no readable [tool.flwr.app] section ({err!r})") from err
    if OVERRIDES_KEY not in declared:
        raise DeployError(f"{path}: [tool.flwr.app.config] has no {OVERRIDES_KEY!r} key, so the "
                          "ServerApp cannot receive the experiment's overrides")
    out = {OVERRIDES_KEY: shlex.join(overrides)}
    if OUTPUT_KEY in declared:
        out[OUTPUT_KEY] = str(run_dir)
    if federation is not None:
        out["federation"] = str(federation)
    return out


def deploy(overrides: Sequence[str], workdir: str | Path, nodes: int | None = None, *,
           insecure: bool = False, port: int | None = None, app_dir: str | Path = REPO_ROOT,
           echo: Callable[[str], None] = print, timeout: float | None = None,
           after_run: Callable[[Deployment], None] | None = None) -> Path:
    """Validate the config, run it on a fresh local deployment, stop everything; the run dir.

    ``after_run`` is called with the still-running deployment once the run completed."""
    from fedmeta.runtime.hydra_config import compose

    from server.simulate import prepare

    overrides, run_dir = run_dir_for(deployment_overrides(overrides))
    cfg = compose(overrides)                       # ConfigError before any process starts
    run_dir.mkdir(parents=True, exist_ok=True)
    silo_root, nodes_dir = prepare(cfg, run_dir)   # one silo + node file per client, once
    clients = len(list(nodes_dir.glob("node-*.json")))
    n = nodes if nodes is not None else clients
    if n != clients:
        log.warning("--nodes %d differs from the %d clients of the federation", n, clients)
    run_config = app_run_config(app_dir, overrides, run_dir, silo_root)
    with Deployment(workdir, insecure=insecure, port=port, echo=echo) as dep:
        dep.start(n, nodes_dir)
        echo(f"submitting run: {n} SuperNodes, output {run_dir}")
        run_id = dep.submit(app_dir, run_config, timeout=timeout)
        echo(f"run {run_id} completed; outputs in {run_dir}")
        if after_run is not None:
            after_run(dep)
    return run_dir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fedmeta-deploy",
        description="Run one experiment on a local Flower SuperLink and one SuperNode per client, "
                    "with TLS and SuperNode authentication unless --insecure. Outputs go to "
                    "outputs/<date>/<time> (or hydra.run.dir=...) like fedmeta-simulate.")
    p.add_argument("--nodes", type=int, default=None,
                   help="SuperNodes to start (default: one per client of the config)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP and no node authentication (local experiments only)")
    p.add_argument("--workdir", default="outputs/deploy",
                   help="certificates, Flower state, database and logs (default: %(default)s)")
    p.add_argument("--superlink-port", type=int, default=None,
                   help="SuperLink port (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="give up on the run after S seconds")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algorithm=reptile runtime.rounds=5")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.nodes is not None and args.nodes < 1:
        print("fedmeta-deploy: --nodes must be >= 1", file=sys.stderr)
        return 2
    try:
        with raise_on_signals():
            deploy(args.overrides, args.workdir, args.nodes, insecure=args.insecure,
                   port=args.superlink_port, timeout=args.timeout,
                   echo=lambda s: print(s, flush=True))
    except ConfigError as err:
        print(f"fedmeta-deploy: invalid configuration: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"fedmeta-deploy: {err}: all processes stopped", file=sys.stderr)
        return 128 + err.signum
    except DeployError as err:
        print(f"fedmeta-deploy: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
