"""``fedmeta-simulate`` as a user runs it: a real subprocess, Hydra, Ray, Flower's simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

EXE = Path(sys.executable).with_name("fedmeta-simulate")
TINY = ["data=synthetic_small", "model=tiny", "runtime.rounds=2", "algorithm.local_steps=1",
        "algorithm.users_per_step=4", "algorithm.negatives=8", "algorithm.inner_steps=1",
        "data.max_eval_users=2", "privacy=local", "privacy.local.target_epsilon=null",
        "privacy.local.noise_multiplier=1.0"]


def _run(args, tmp_path, env=None, timeout=600):
    return subprocess.run([str(EXE), *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("override, key", [("runtime.rounds=0", "runtime.rounds"),
                                           ("privacy.central.side=both", "privacy.central.side"),
                                           ("runtime.kind=deployment", "runtime.kind"),
                                           ("runtime.num_cpus=4096", "runtime.num_cpus")])
def test_invalid_config_fails_before_any_work_naming_the_key(tmp_path, override, key):
    res = _run([override], tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert key in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_unknown_key_is_refused_by_hydra_with_its_name(tmp_path):
    res = _run(["runtime.nope=1"], tmp_path, timeout=120)
    assert res.returncode != 0 and "nope" in res.stderr and "Traceback" not in res.stderr


def _leftovers(marker: str) -> list[psutil.Process]:
    """Processes (Ray's raylet, GCS, workers...) that inherited this run's environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("FEDMETA_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_simulation_with_ray_writes_every_output_and_leaves_no_process(tmp_path):
    marker = uuid.uuid4().hex
    env = {"FEDMETA_TEST_MARKER": marker}
    try:
        # two CPUs per client: one Ray actor at a time on a 2-core machine (each actor holds
        # torch and a node, ~0.7 GB), so the suite's peak memory stays bounded
        res = _run(TINY + [f"runtime.num_cpus={min(2, os.cpu_count() or 1)}"], tmp_path, env=env)
    finally:
        left = _leftovers(marker)
        for proc in left:
            proc.kill()
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert not left, [p.pid for p in left]
    out = tmp_path / "run"
    assert "round 1/2" in res.stdout and "round 2/2" in res.stdout
    assert (out / "metrics.csv").stat().st_size > 0
    assert list((out / "plots").glob("*.png")) and (out / "checkpoint" / "state.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["config"]["runtime"]["kind"] == "simulation"
    assert summary["failures_total"] == 0
    assert all(len(r["accepted"]) == 4 and r["bytes_received"] > 0 for r in summary["rounds"])
    assert {"ecommerce", "social"} <= set(summary["final_metrics"])
    # every Ray actor found its own node file; each node reported the epsilon of its own
    # ledger, which lives in the node's state directory, never in the server's checkpoint
    eps, delta = summary["client_epsilon"], summary["client_delta"]
    assert set(eps) == {"ecommerce-0", "ecommerce-1", "social-0", "social-1"}
    assert all(eps[c] > 0 and 0 < delta[c] < 0.01 for c in eps)
    for cid in eps:
        assert (out / "nodes" / cid / "privacy_ledger.json").exists()
        assert (out / "silos" / cid / "silo.json").exists()
    assert "client_privacy" in json.loads((out / "checkpoint" / "state.json").read_text())


@pytest.mark.slow
def test_ctrl_c_during_round_one_stops_everything(tmp_path):
    """SIGINT while Ray actors train round 1: the command exits promptly (the README records
    the measured time), names the signal, and leaves no Flower or Ray process behind."""
    import signal
    import time

    marker = uuid.uuid4().hex
    proc = subprocess.Popen([str(EXE), *TINY, "runtime.rounds=5",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEDMETA_TEST_MARKER": marker})
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if any("ray::" in " ".join(p.cmdline()) for p in _leftovers(marker)
                   if p.is_running()):
                break                       # Ray actors exist: round 1 is under way
            time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        left = _leftovers(marker)
        for p in left:
            p.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "SIGINT" in err and "stopped" in err
    assert not left, [(p.pid, p.name()) for p in left]
    assert took < 30, took
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_simulation_on_an_existing_ray_cluster_on_loopback(tmp_path):
    """``runtime.ray_address`` runs the virtual SuperNodes on a Ray head the user started
    (here on 127.0.0.1 only). Node files reach the cluster's workers through the environment
    of ``ray start``, as any per-worker setting does."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "FEDMETA_TEST_MARKER": marker,
           "FEDMETA_NODES_DIR": str(run / "node-configs")}
    env.pop("RAY_ADDRESS", None)
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             # one CPU: one client actor at a time (memory, as above)
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                             "--block"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        res = subprocess.run([str(EXE), *TINY, f"runtime.ray_address=127.0.0.1:{port}",
                              f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=900,
                             cwd=tmp_path, env={**os.environ, "FEDMETA_TEST_MARKER": marker})
        alive = head.poll() is None
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        for proc in _leftovers(marker):
            proc.kill()
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(port) in current.read_text():
            current.unlink()
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert alive                            # the run used the head and left it running
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failures_total"] == 0 and len(summary["client_epsilon"]) == 4


@pytest.mark.parametrize("override", [["runtime.device=cuda"],
                                      pytest.param(["runtime=inprocess", "runtime.device=cuda:0"],
                                                   marks=pytest.mark.slow)])
def test_cuda_without_a_gpu_is_refused_in_one_line_before_any_work(tmp_path, override):
    """No visible CUDA device (``CUDA_VISIBLE_DEVICES=""`` hides any real one): exit 2 with
    one line naming the key, not a traceback from deep inside a node after the silos are cut."""
    res = _run(override, tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[0].startswith("fedmeta-simulate: runtime.device:") and "CUDA" in lines[0]
    assert not (tmp_path / "run" / "silos").exists()
