"""``fedmeta-bench --device``: without a GPU ``cuda`` is a one-line refusal; the device reaches
every section's overrides and cells; timers synchronise; nvidia-smi is sampled or said to be
missing. Nothing here needs a GPU: CUDA calls are replaced where a test needs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.run import main

EXE = Path(sys.executable).with_name("fedmeta-bench")


def test_cuda_refused_before_any_figure_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "BENCHMARKS.md"
    assert main(["--device", "cuda", "--only", "P1", "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines() == ["fedmeta-bench: --device cuda but no CUDA device "
                                            "is visible"]
    assert "P1" not in err.out and not out.exists()


@pytest.mark.slow   # a fresh interpreter importing the bench stack; the check above is the same code
def test_cuda_refusal_from_the_command_line_is_one_line_without_traceback(tmp_path):
    res = subprocess.run([str(EXE), "--device", "cuda", "--out", str(tmp_path / "B.md")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "cuda" in lines[0] and not (tmp_path / "B.md").exists()


# ---- the bench device reaches every section ------------------------------------------------
from bench import cell, p1_flower, p2_dp, p3_maml, p4_scale, p5_peer, p6_node  # noqa: E402
from bench import q1_quality, q2_quality  # noqa: E402
from bench import common  # noqa: E402
from bench.common import DEVICE_ENV  # noqa: E402


def section_overrides() -> dict[str, list[str]]:
    """Every override list a section hands to a run or a cell, built for the current device."""
    return {"cell": cell.base_overrides(), "P1 small": p1_flower.overrides(2, 2),
            "P1 default": p1_flower.default_overrides(), "P3": p3_maml.overrides(),
            "P5 none": p5_peer.overrides(False, "none"),
            "P5 central quick": p5_peer.overrides(True, "central"),
            "P6": p6_node.overrides(2, 40), "Q1": q1_quality.cell_overrides(
                q1_quality.QUICK, [], q1_quality.DP),
            "Q2": q2_quality.experiment_overrides(q2_quality.DATASETS["ml100k"])}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_section_runs_on_the_bench_device(device, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, device)
    for name, ovr in section_overrides().items():
        devices = [o for o in ovr if o.startswith("runtime.device=")]
        assert devices == [f"runtime.device={device}"], (name, ovr)
    sim = common.simulation_overrides()
    if device == "cuda":   # Ray hides the GPU from an actor that asks for none
        assert len(sim) == 1 and sim[0].startswith("runtime.num_gpus=")
        assert 0 < float(sim[0].split("=")[1]) <= 1
    else:
        assert sim == []
    assert p5_peer.peer_env(1)["PFL_PYTORCH_DEVICE"] == device


def test_the_default_device_is_cpu_and_a_bad_one_is_refused(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert common.bench_device() == "cpu" and common.device_overrides() == ["runtime.device=cpu"]
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="FEDMETA_BENCH_DEVICE='tpu'"):
        common.bench_device()


def test_run_cell_hands_the_device_to_the_cell_process(monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(cmd=cmd, env=kw["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout='noise\n{"ok": 1}\n', stderr="")

    monkeypatch.setenv(DEVICE_ENV, "cuda")
    monkeypatch.setattr(common.subprocess, "run", fake_run)
    assert common.run_cell("dp", {"size": "tiny"}, timeout=5) == {"ok": 1}
    assert seen["env"][DEVICE_ENV] == "cuda" and seen["cmd"][2] == "bench.cell"


def _dp_result(ms: float, paired: float, gpu) -> dict:
    return {"median_s": ms / 1000, "times": [ms / 1000], "rss_setup_mb": 400.0,
            "peak_rss_mb": 450.0, "peak_gpu_mb": gpu, "paired_ratio": paired, "params": 1000,
            "table_params": 600, "grads_s": 0.01, "privatize_s": 0.002, "rows_read": 50}


def _fake_p2(monkeypatch, paired: dict[str, float], gpu):
    specs = []

    def fake_cell(kind, spec, timeout):
        specs.append(spec)
        return _dp_result(10.0 * paired[spec["mode"]], paired[spec["mode"]], gpu)

    monkeypatch.setattr(p2_dp, "run_cell", fake_cell)
    monkeypatch.setattr(p2_dp, "minilm_available", lambda: False)
    return specs


def test_p2_target_is_1_3_on_the_paired_ratio(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert p2_dp.TARGET == 1.3
    _fake_p2(monkeypatch, {"plain": 1.0, "hooks": 2.0, "ghost": 1.6, "functorch": 1.25}, None)
    text = p2_dp.run(False, echo=lambda s: None)
    line = next(ln for ln in text.splitlines() if ln.startswith("**Target**"))
    assert line.startswith("**Target** DP/non-DP <= 1.3 on tiny and small (paired ratio): ")
    assert "tiny: best DP mode functorch x1.25 -> **met**" in line
    assert "1.5" not in line
    assert p2_dp.verdict({"tiny": (1.4, "ghost")}) == [
        "tiny: best DP mode ghost x1.40 -> **missed** (+8% over)", "small: not run"]


def _table_header(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_p2_on_cuda_adds_the_gpu_peak_and_keeps_the_cpu_table(monkeypatch):
    paired = {"plain": 1.0, "hooks": 1.5, "ghost": 1.4, "functorch": 1.2}
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    _fake_p2(monkeypatch, paired, None)
    cpu = p2_dp.run(True, echo=lambda s: None)
    assert _table_header(cpu, "model")[-2:] == ["peak RSS MB", "step MB"]
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    _fake_p2(monkeypatch, paired, 123.0)
    gpu = p2_dp.run(True, echo=lambda s: None)
    header = _table_header(gpu, "model")
    assert header[-1] == "peak GPU MB"
    row = next(ln for ln in gpu.splitlines() if ln.startswith("| tiny | ghost |"))
    assert row.strip("|").split("|")[-1].strip() == "123"
    assert "on the GPU" in gpu


def test_p4_and_p6_tables_add_a_gpu_column_on_cuda_only():
    combo = {"algorithm": "fedavg", "dp": False, "budget_s": 0.0, "population": 800,
             "node_s": 1.0, "round_s": [2.0, 2.0], "round_cpu_s": [1.0, 1.0], "sampled": [64, 64],
             "round_peak_mb": 50.0, "round_gpu_peak_mb": 70.0, "profile": {}, "steps": 2}
    res = {1000: {"build": {}, "node": {"combos": [combo]}}}
    cpu, gpu = p4_scale.round_rows(res), p4_scale.round_rows(res, cuda=True)
    assert len(gpu[0]) == len(cpu[0]) + 1 and gpu[0][-1] == 70.0 and gpu[0][:-1] == cpu[0]
    # on CUDA the growth verdict compares wall time (CPU time is not the GPU's work)
    res[100_000] = {"build": {}, "node": {"combos": [{**combo, "round_s": [6.0, 6.0]}]}}
    assert p4_scale.growth(res)[0][-1] == 1.0 and p4_scale.growth(res, cuda=True)[0][-1] == 3.0
    phases = {k: {"rss_mb": 500.0, "hwm_mb": 600.0, "s": float(i)}
              for i, k in enumerate(("imports", "silo", "node", "train", "eval"))}
    phases["eval"]["gpu_peak_mb"] = 80.0
    node = {"phases": phases, "train_users": 400, "cold_users": 100}
    p6 = {"fed": {"2": {"partition": {}, "plain": node, "dp": {"error": "boom"}}}}
    cpu, gpu = p6_node.node_rows(p6), p6_node.node_rows(p6, cuda=True)
    assert [len(r) for r in gpu] == [len(r) + 1 for r in cpu] == [11, 11]
    assert gpu[0][-1] == 80.0


# ---- synchronising timer, GPU peak --------------------------------------------------------
def test_timer_measures_on_cpu_without_touching_cuda(monkeypatch):
    def no_cuda():
        raise AssertionError("synchronize called on CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    with common.Timer() as t:
        time.sleep(0.05)
    assert 0.05 <= t.s < 5 and t.cpu_s < t.s
    med, times = common.median_time(lambda: time.sleep(0.01), repeats=3, warmup=0)
    assert len(times) == 3 and all(x >= 0.01 for x in times) and med == sorted(times)[1]
    assert common.gpu_peak_mb() is None


def test_timer_synchronises_cuda_at_both_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append(time.perf_counter()))
    with common.Timer("cuda") as t:
        time.sleep(0.02)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.02 and t.s >= 0.02
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: reset.append(1))
    common.reset_gpu_peak("cuda")
    assert reset == [1] and common.gpu_peak_mb("cuda") == 3.0


# ---- nvidia-smi sampling, GPU facts, Machine section ------------------------------------
def test_parse_smi_reads_one_pair_per_gpu_and_names_a_bad_line():
    assert common.parse_smi("37, 1024\n") == [(37.0, 1024.0)]
    assert common.parse_smi("0, 5\n100, 81000\n\n") == [(0.0, 5.0), (100.0, 81000.0)]
    with pytest.raises(ValueError, match=r"line 2: '\[N/A\], 12'"):
        common.parse_smi("1, 2\n[N/A], 12\n")


def test_sampler_without_nvidia_smi_says_not_available():
    s = common.GpuSampler(exe="nvidia-smi-that-does-not-exist").start()
    s.stop()
    assert s.samples == []
    assert s.summary() == {"GPU utilisation during the run":
                           "not available (nvidia-smi-that-does-not-exist not found)"}


def test_sampler_polls_in_the_background_and_reports_mean_and_max():
    lines = iter(["20, 1000\n", "40, 3000\n"] + ["60, 2000\n"] * 1000)

    def fake(cmd, **kw):
        assert cmd[1:] == common.SMI_QUERY
        return subprocess.CompletedProcess(cmd, 0, stdout=next(lines), stderr="")

    # any binary that exists stands in for nvidia-smi; the fake runner answers for it
    s = common.GpuSampler(interval=0.01, exe=sys.executable, runner=fake).start()
    deadline = time.time() + 10
    while len(s.samples) < 3 and time.time() < deadline:
        time.sleep(0.01)
    s.stop()
    assert not s._thread.is_alive()
    n = len(s.samples)
    assert n >= 3
    util = [20, 40] + [60] * (n - 2)
    got = s.summary()
    assert got["GPU utilisation during the run"].startswith(
        f"mean {sum(util) / n:.0f} %, max 60 % over {n} samples")
    assert "max 3000 MiB" in got["GPU memory used during the run"]


def test_sampler_stops_on_unreadable_output_and_keeps_what_it_had():
    outs = iter([("55, 10\n", 0), ("", 9)])

    def fake(cmd, **kw):
        out, rc = next(outs)
        return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr="")

    s = common.GpuSampler(interval=0.01, exe=sys.executable, runner=fake)
    s.start()
    s._thread.join(timeout=10)      # the loop ends by itself at the failed poll
    assert len(s.samples) == 1 and "exit 9" in s.problem
    got = s.summary()
    assert got["GPU utilisation during the run"].startswith("mean 55 %, max 55 % over 1")
    assert "exit 9" in got["GPU sampling stopped"]


def test_gpu_facts_name_memory_cuda_and_driver(monkeypatch):
    class Props:
        total_memory = 16 * 2**30

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    facts = common.gpu_facts(exe="nvidia-smi-that-does-not-exist")
    assert facts == {"GPU": "Fake GPU (cuda:0 of 1)", "GPU memory": "16.0 GiB",
                     "CUDA (torch.version.cuda)": "12.4",
                     "NVIDIA driver": "not available (nvidia-smi-that-does-not-exist not found)"}


def test_cuda_invocation_sets_the_device_records_the_gpu_and_restores(tmp_path, monkeypatch):
    import bench.run as run_mod

    seen = []

    class FakeSection:
        @staticmethod
        def run(quick, echo=print):
            seen.append(common.bench_device())
            return "## P3 fake\n\n| a |\n|---|\n| 1 |"

    class FakeSampler:
        def start(self):
            return self

        def stop(self):
            seen.append("stopped")

        def summary(self):
            return {"GPU utilisation during the run": "mean 50 %, max 90 % over 4 samples"}

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run_mod, "figure", lambda name: FakeSection)
    monkeypatch.setattr(run_mod, "GpuSampler", FakeSampler)
    monkeypatch.setattr(run_mod, "gpu_facts", lambda: {"GPU": "Fake GPU (cuda:0 of 1)"})
    out = tmp_path / "B.md"
    assert main(["--device", "cuda", "--only", "P3", "--out", str(out)]) == 0
    assert seen == ["cuda", "stopped"] and DEVICE_ENV not in os.environ
    machine = common.split_sections(out.read_text())["machine"]
    assert "| device | cuda |" in machine and "| GPU | Fake GPU (cuda:0 of 1) |" in machine
    assert "| GPU utilisation during the run | mean 50 %, max 90 % over 4 samples |" in machine


def test_p2_names_the_objective_its_cells_composed():
    from bench.p2_dp import objective_text

    full = objective_text({"loss": "full", "item_ids": "shared", "catalogue": 300})
    assert "whole catalogue of 300 items" in full and "`model.item_ids=shared`" in full
    assert "sampled softmax" in objective_text({"loss": "sampled", "item_ids": "none"})
