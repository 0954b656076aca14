import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from fedmeta.config import ConfigError
from fedmeta.runtime.hydra_config import compose
from server import certs, deploy, supervisor

PY = sys.executable


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def reaper():
    """Kill, by PID, anything a test left running, so a failing test leaks nothing."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


# ----------------------------------------------------------------------------- supervisor

def test_child_is_killed_when_the_block_raises(tmp_path, reaper):
    with pytest.raises(RuntimeError, match="boom"):
        with supervisor.Supervisor(tmp_path) as sup:
            proc = sup.start("sleeper", ["sleep", "60"])
            reaper.append(proc.pid)
            assert proc.alive()
            raise RuntimeError("boom")
    assert _gone(proc.pid)
    assert sup.procs == []


def test_detached_grandchild_is_killed_too(tmp_path, reaper):
    """Like SuperLink's flower-superexec: a grandchild in its own session, outside the
    child's process group, must not survive."""
    script = ("import subprocess, time; p = subprocess.Popen(['sleep', '60'], "
              "start_new_session=True); print(p.pid, flush=True); time.sleep(60)")
    with supervisor.Supervisor(tmp_path) as sup:
        proc = sup.start("parent", [PY, "-c", script])
        reaper.append(proc.pid)
        assert _wait_for(lambda: proc.log_path.read_text().strip() != "")
        grandchild = int(proc.log_path.read_text().split()[0])
        reaper.append(grandchild)
        assert os.getpgid(grandchild) != os.getpgid(proc.pid)
    assert _gone(proc.pid) and _gone(grandchild)


def test_sigterm_ignoring_child_is_killed_after_grace(tmp_path, reaper):
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    sup = supervisor.Supervisor(tmp_path, grace=0.5)
    proc = sup.start("stubborn", [PY, "-c", script])
    reaper.append(proc.pid)
    assert _wait_for(lambda: "ready" in proc.log_path.read_text())
    t0 = time.monotonic()
    sup.stop_all()
    assert _gone(proc.pid)
    assert proc.popen.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 8


def test_stubborn_children_are_killed_together_not_one_after_another(tmp_path, reaper):
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    sup = supervisor.Supervisor(tmp_path, grace=1.0)
    procs = [sup.start(f"s{i}", [PY, "-c", script]) for i in range(4)]
    reaper.extend(p.pid for p in procs)
    assert _wait_for(lambda: all("ready" in p.log_path.read_text() for p in procs))
    t0 = time.monotonic()
    sup.stop_all()
    assert all(_gone(p.pid) for p in procs)
    assert time.monotonic() - t0 < 3.5      # two waves of 1 s grace, not four


def test_first_process_is_stopped_after_the_others(tmp_path, reaper):
    """SuperNodes must go before the SuperLink: a leaf checks on SIGTERM that the hub lives."""
    with supervisor.Supervisor(tmp_path) as sup:
        hub = sup.start("hub", ["sleep", "60"])
        leaf_script = (f"import os, signal, sys, time\n"
                       f"def bye(*_):\n"
                       f"    try:\n        os.kill({hub.pid}, 0); print('hub alive', flush=True)\n"
                       f"    except ProcessLookupError:\n        print('hub gone', flush=True)\n"
                       f"    sys.exit(0)\n"
                       f"signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(60)\n")
        leaf = sup.start("leaf", [PY, "-c", leaf_script])
        reaper.extend([hub.pid, leaf.pid])
        assert _wait_for(lambda: "ready" in leaf.log_path.read_text())
    assert "hub alive" in leaf.log_path.read_text()
    assert _gone(hub.pid) and _gone(leaf.pid)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_raises_interrupted_and_stops_children(tmp_path, reaper, signum):
    previous = signal.getsignal(signum)
    with pytest.raises(supervisor.Interrupted) as info:
        with supervisor.raise_on_signals(), supervisor.Supervisor(tmp_path) as sup:
            procs = [sup.start(f"s{i}", ["sleep", "60"]) for i in range(2)]
            reaper.extend(p.pid for p in procs)
            os.kill(os.getpid(), signum)
            time.sleep(5)                      # the handler interrupts this
    assert info.value.signum == signum
    assert all(_gone(p.pid) for p in procs)
    assert signal.getsignal(signum) is previous          # handlers restored


def test_child_log_captures_output(tmp_path):
    with supervisor.Supervisor(tmp_path) as sup:
        proc = sup.start("echo", [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
        proc.popen.wait(10)
    assert proc.tail().split() == ["out", "err"]


def test_child_env_puts_venv_first_and_isolates_flower(tmp_path):
    env = deploy.child_env(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert Path(env["PATH"].split(os.pathsep)[0], "flower-superexec").exists()
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


# ----------------------------------------------------------------------------- config side

def test_run_dir_is_absolute_hydra_style_and_passed_as_output_dir(tmp_path, monkeypatch):
    import datetime

    monkeypatch.chdir(tmp_path)
    now = datetime.datetime(2025, 3, 4, 5, 6, 7)
    overrides, run_dir = deploy.run_dir_for(["algorithm=reptile"], now)
    assert run_dir == tmp_path / "outputs" / "2025-03-04" / "05-06-07"
    assert overrides == ["algorithm=reptile", f"output_dir={run_dir}"]
    overrides, run_dir = deploy.run_dir_for(["hydra.run.dir=elsewhere", "seed=1"])
    assert run_dir == tmp_path / "elsewhere"
    assert overrides == ["seed=1", f"output_dir={run_dir}"]


def test_runtime_is_forced_to_deployment():
    assert deploy.deployment_overrides(["seed=3", "runtime=deployment"]) == [
        "runtime=deployment", "seed=3"]
    with pytest.raises(ConfigError, match="runtime"):
        deploy.deployment_overrides(["runtime=simulation"])


def test_run_config_follows_the_app_declaration(tmp_path):
    with pytest.raises(deploy.DeployError, match=r"tool.flwr.app"):
        (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
        deploy.app_run_config(tmp_path, ["a=1"], tmp_path / "run")
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\nother = 1\n")
    with pytest.raises(deploy.DeployError, match="overrides"):
        deploy.app_run_config(tmp_path, ["a=1"], tmp_path / "run")
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\noverrides = ''\n")
    tricky = ["data.clients=[{domain:x,n_clients:1}]", "name=a b"]
    cfg = deploy.app_run_config(tmp_path, tricky, tmp_path / "run")
    assert cfg.keys() == {"overrides"}                       # no undeclared output-dir
    assert shlex.split(cfg["overrides"]) == tricky
    (tmp_path / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\noverrides = ''\noutput-dir = ''\n")
    assert deploy.app_run_config(tmp_path, [], tmp_path / "run")["output-dir"] == str(tmp_path / "run")


def test_repo_app_declares_the_run_config_keys():
    cfg = deploy.app_run_config(deploy.REPO_ROOT, ["seed=1"], Path("/x"))
    assert cfg["overrides"] == "seed=1"


def test_invalid_config_fails_before_any_process(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(supervisor.Supervisor, "start", lambda self, *a, **k: started.append(a))
    code = deploy.main(["--workdir", str(tmp_path / "wd"), "algorithm.name=nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "algorithm.name" in err
    assert started == [] and not (tmp_path / "wd").exists()


# ----------------------------------------------------------------------------- real processes

TWO_CLIENTS = ("data.clients=[{domain:ecommerce,n_clients:1,new_clients:0,scheme:iid},"
               "{domain:social,n_clients:1,new_clients:0,scheme:iid}]")
# every message starts a ClientApp process (imports + federation build, ~10 s on 2 cores), so
# the data and the evaluation are kept small
SMALL = ["data=synthetic_small", TWO_CLIENTS, "model=tiny", "runtime.rounds=2",
         "algorithm.local_steps=1", "algorithm.users_per_step=4", "algorithm.negatives=8",
         "algorithm.inner_steps=1", "data.max_len=10", "data.max_eval_users=8",
         "data.synthetic.ecommerce_users=60", "data.synthetic.social_users=60",
         "data.synthetic.ecommerce_items=60", "data.synthetic.social_items=60"]


def _flower_processes(markers: list[str]) -> list[psutil.Process]:
    """Flower daemons whose command line mentions this test's work dir or SuperLink port."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["status"] != psutil.STATUS_ZOMBIE and "flower-" in cmd
                    and any(m in cmd for m in markers)):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_tls_authenticated_deployment_end_to_end(tmp_path, reaper):
    workdir, run_dir = tmp_path / "wd", tmp_path / "run"
    seen: dict = {}

    def after_run(dep: deploy.Deployment):
        seen["port"] = dep.port
        reaper.extend(p.pid for p in dep.sup.procs)
        assert "https://" in dep.superlink.log_path.read_text()
        # a SuperNode whose key was never registered is refused
        private, public = certs.make_node_key()
        (tmp_path / "rogue").write_bytes(private)
        (tmp_path / "rogue").chmod(0o600)
        rogue = dep.start_supernode(9, 2, tmp_path / "rogue", name="rogue")
        reaper.append(rogue.pid)
        try:
            seen["rogue_code"] = rogue.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            seen["rogue_code"] = None
        seen["rogue_log"] = rogue.tail(80)
        seen["argv"] = [list(p.popen.args) for p in dep.supernodes]
        seen["pids"] = [pid for p in dep.sup.procs for pid in p.family]
        reaper.extend(seen["pids"])

    lines: list[str] = []
    out = deploy.deploy([f"hydra.run.dir={run_dir}", *SMALL], workdir, timeout=900,
                        after_run=after_run, echo=lines.append)
    assert out == run_dir.resolve()
    # the unregistered node exits with Flower's connection-failure code 305
    assert seen["rogue_code"] not in (None, 0)
    assert "305" in seen["rogue_log"], seen["rogue_log"]
    # the run wrote the same outputs as the simulation
    metrics = pd.read_csv(run_dir / "metrics.csv")
    train = metrics[metrics["phase"] == "train"]
    assert sorted(train["round"].unique()) == [1, 2]
    assert train.groupby("round")["client"].nunique().tolist() == [2, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["runtime"]["kind"] == "deployment"
    assert summary["config"]["data"]["max_eval_users"] == 8      # the overrides reached the app
    assert (run_dir / "checkpoint").is_dir()
    # per-round progress was streamed to the console
    assert any(line.startswith("round 1/2") for line in lines), lines
    assert any(line.startswith("round 2/2") for line in lines), lines
    # each SuperNode was given only its own node file, naming only its own silo
    from fedmeta.data.silo import read_silo
    from fedmeta.runtime.node import NodeConfig

    owners = set()
    for argv in seen["argv"]:
        files = [a for a in argv if "fedmeta-node=" in a]
        assert len(files) == 1 and files[0].endswith(".json\"")
        path = files[0].split('fedmeta-node="')[1].rstrip('"')
        nc = NodeConfig.load(path)
        silo = read_silo(nc.silo_dir)
        assert silo.client_id == nc.client_id and set(silo.data.interactions["user"]) <= set(
            silo.partition.users)
        owners.add(nc.client_id)
    assert len(owners) == len(seen["argv"])
    # nothing left behind
    assert all(_gone(pid) for pid in seen["pids"])
    assert _flower_processes([str(workdir), f":{seen['port']}"]) == []
    assert [c for c in psutil.Process().children(recursive=True)
            if "flower" in " ".join(c.cmdline()) or "flwr" in c.name()] == []


def test_superlink_start_failure_reports_its_log(tmp_path, reaper):
    """A SuperLink that dies at start-up: the error names it and carries its log tail."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "flower-superlink"
    fake.write_text("#!/bin/sh\necho 'ERROR: cannot load the certificate' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(deploy.DeployError) as info:
        with deploy.Deployment(tmp_path / "wd", echo=lambda s: None) as dep:
            dep.bin = fake_bin
            dep.start(2)
    message = str(info.value)
    assert "superlink exited with code 3" in message
    assert "cannot load the certificate" in message
    assert (tmp_path / "wd" / "logs" / "superlink.log").exists()


def test_taken_port_is_refused_before_starting(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with deploy.Deployment(tmp_path / "wd", port=port, echo=lambda s: None) as dep:
            with pytest.raises(deploy.DeployError, match="in use"):
                dep.start(1)
            assert dep.sup.procs == []
