"""Shared pieces of the benchmark: the device, timing, fresh-process cells, machine facts,
GPU utilisation, markdown.

The bench device (``--device``) is held in the environment variable ``FEDMETA_BENCH_DEVICE``
rather than a module global: cells and ``fedmeta-simulate`` runs are fresh processes, and
the environment is the one thing every one of them inherits.

Peak memory is read with ``resource.getrusage`` (max RSS) inside a fresh interpreter per
cell: torch allocates outside Python's allocator, so tracemalloc would miss most of it, and
a process that already ran a bigger cell would report that cell's peak.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]

# ---- the bench device ---------------------------------------------------------------------
DEVICE_ENV = "FEDMETA_BENCH_DEVICE"
DEVICES = ("cpu", "cuda")


def bench_device() -> str:
    """The device this invocation measures on (``cpu`` unless ``--device`` said otherwise)."""
    dev = os.environ.get(DEVICE_ENV) or "cpu"
    if dev not in DEVICES:
        raise ValueError(f"{DEVICE_ENV}={dev!r}: not one of {list(DEVICES)}")
    return dev


def set_bench_device(dev: str) -> None:
    if dev not in DEVICES:
        raise ValueError(f"bench device {dev!r}: not one of {list(DEVICES)}")
    os.environ[DEVICE_ENV] = dev


def on_cuda(device: str | None = None) -> bool:
    return (device or bench_device()).startswith("cuda")


def device_overrides(device: str | None = None) -> list[str]:
    """The Hydra override that puts a run's nodes on the bench device (explicit, never
    ``auto``: a CPU figure must not silently move to a GPU the machine happens to have)."""
    return [f"runtime.device={device or bench_device()}"]


def simulation_overrides(device: str | None = None) -> list[str]:
    """Extra overrides for ``runtime=simulation`` on the bench device. On CUDA each virtual
    SuperNode asks Ray for a share of the GPU (without one Ray hides the GPU from the actor);
    the share is 1/cores, so as many actors run at once as on CPU (one CPU each) and the GPU
    is not what limits the concurrency. Nothing on CPU."""
    if not on_cuda(device):
        return []
    return [f"runtime.num_gpus={1 / max(1, os.cpu_count() or 1):.4g}"]


def synchronize(device: str | None = None) -> None:
    """Wait for queued GPU kernels: a CUDA call returns before its work is done, so a timer
    that does not wait measures the launch, not the work. Nothing to wait for on CPU."""
    if on_cuda(device):
        import torch

        torch.cuda.synchronize()


class Timer:
    """``with Timer() as t: ...`` -> ``t.s`` wall seconds, ``t.cpu_s`` this process's CPU
    seconds; the device is synchronised at both ends (:func:`synchronize`)."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.s = self.cpu_s = float("nan")

    def __enter__(self):
        synchronize(self.device)
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.s = time.perf_counter() - self._t
        self.cpu_s = time.process_time() - self._c
        return False


def timed(fn, device: str | None = None) -> float:
    with Timer(device) as t:
        fn()
    return t.s


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [timed(fn) for _ in range(repeats)]
    return statistics.median(times), times


def reset_gpu_peak(device: str | None = None) -> None:
    """Start a fresh ``max_memory_allocated`` window (CUDA only): the peak that follows is
    the timed region's own, not set-up's."""
    if on_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()


def gpu_peak_mb(device: str | None = None) -> float | None:
    """Peak CUDA memory allocated by torch since :func:`reset_gpu_peak`; None on CPU (RSS
    is the CPU figure, there is no GPU allocator to read)."""
    if not on_cuda(device):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far.

    ``VmHWM`` of the process's own address space: ``ru_maxrss`` would not do, because Linux
    carries the parent's high-water mark through fork and exec into the child's, so a cell
    started after a big one in the parent reports the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def cell_env() -> dict[str, str]:
    """A cell's environment: one torch thread unless set, and the bench device."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            DEVICE_ENV: bench_device()}


def run_json(cmd: list[str], timeout: float, cwd: Path | str = REPO,
             env: dict | None = None) -> dict:
    """Run one measuring process; its result is the last stdout line starting with '{'.
    A timeout, a non-zero exit or no result becomes ``{"error": ...}`` with the last line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:160]}"}
    return json.loads(lines[-1])


def run_cell(kind: str, spec: dict, timeout: float) -> dict:
    """Run ``bench.cell`` for one measurement in a fresh interpreter; JSON back on stdout."""
    return run_json([PYTHON, "-m", "bench.cell", kind, json.dumps(spec)], timeout,
                    env=cell_env())


def cell_main(cells: dict) -> int:
    """A cell module's entry point: ``python -m MODULE KIND SPEC_JSON`` prints one JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    sys.stdout.write(json.dumps(cells[kind](spec)) + "\n")
    return 0


def machine() -> dict[str, str]:
    import flwr  # noqa: F401  (the bench measures the Flower runtime, so it may import flwr)
    import opacus
    import torch
    import transformers
    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"CPU": cpu, "cores": str(os.cpu_count()), "RAM": ram, "Python": platform.python_version(),
            "torch": torch.__version__, "flwr": version("flwr"), "opacus": opacus.__version__,
            "transformers": transformers.__version__, "load average at start": load}


# ---- the GPU: facts and utilisation ------------------------------------------------------
SMI = "nvidia-smi"
SMI_QUERY = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def smi_query(fields: str, exe: str = SMI, timeout: float = 10.0) -> list[str] | str:
    """Lines of ``nvidia-smi --query-gpu=FIELDS`` (one per GPU), or a sentence saying why
    there are none: the Machine section states what it could not read, never a guess."""
    path = shutil.which(exe)
    if path is None:
        return f"not available ({exe} not found)"
    try:
        proc = subprocess.run([path, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"not available ({exe}: {type(err).__name__})"
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()[:1] or [f"exit {proc.returncode}"]
        return f"not available ({exe}: {why[0][:120]})"
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]


def gpu_facts(exe: str = SMI) -> dict[str, str]:
    """The GPU the bench device names (``cuda`` = the current CUDA device): name, total
    memory, CUDA runtime torch was built with, and the driver (from nvidia-smi)."""
    import torch

    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    driver = smi_query("driver_version", exe)
    return {"GPU": f"{torch.cuda.get_device_name(idx)} (cuda:{idx} of "
                   f"{torch.cuda.device_count()})",
            "GPU memory": f"{props.total_memory / 2**30:.1f} GiB",
            "CUDA (torch.version.cuda)": str(torch.version.cuda),
            "NVIDIA driver": driver if isinstance(driver, str) else ", ".join(sorted(set(driver)))}


def parse_smi(text: str) -> list[tuple[float, float]]:
    """``utilization.gpu, memory.used`` lines (csv, no header, no units) -> one (percent,
    MiB) pair per GPU; a line that is not two numbers is an error naming the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 2:
                raise ValueError
            out.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise ValueError(f"nvidia-smi output line {n}: {line.strip()[:80]!r} is not "
                             "'<utilisation %>, <memory MiB>'") from None
    return out


class GpuSampler:
    """Polls ``nvidia-smi`` from a background thread every ``interval`` seconds while the
    figures run, so the Machine section can say how busy the GPU was (mean / max per GPU).

    When the binary is missing or its output cannot be read, :meth:`summary` says so; it
    never reports a number that was not sampled."""

    def __init__(self, interval: float = 1.0, exe: str = SMI, runner=subprocess.run):
        self.interval, self.exe, self.runner = interval, exe, runner
        self.samples: list[list[tuple[float, float]]] = []
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "GpuSampler":
        self.path = shutil.which(self.exe)
        if self.path is None:
            self.problem = f"{self.exe} not found"
            return self
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> bool:
        """One poll; False (and :attr:`problem` set) when it failed, which ends the polling."""
        try:
            proc = self.runner([self.path, *SMI_QUERY], capture_output=True, text=True,
                               timeout=10)
            if proc.returncode != 0:
                raise ValueError(f"exit {proc.returncode}")
            got = parse_smi(proc.stdout)
            if not got:
                raise ValueError("no GPU listed")
        except (OSError, ValueError, subprocess.TimeoutExpired) as err:
            self.problem = f"{self.exe}: {err}"
            return False
        self.samples.append(got)
        return True

    def _loop(self) -> None:
        while self.sample() and not self._stop.wait(self.interval):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def summary(self) -> dict[str, str]:
        """Machine-table rows: utilisation and memory used, mean / max over the samples."""
        if not self.samples:
            why = self.problem or "no sample taken yet"
            return {"GPU utilisation during the run": f"not available ({why})"}
        rows = {}
        gpus = max(len(s) for s in self.samples)
        for g in range(gpus):
            util = [s[g][0] for s in self.samples if len(s) > g]
            mem = [s[g][1] for s in self.samples if len(s) > g]
            tag = f" (GPU {g})" if gpus > 1 else ""
            rows[f"GPU utilisation during the run{tag}"] = (
                f"mean {statistics.fmean(util):.0f} %, max {max(util):.0f} % over "
                f"{len(util)} samples, one per {self.interval:g} s (nvidia-smi)")
            rows[f"GPU memory used during the run{tag}"] = (
                f"mean {statistics.fmean(mem):.0f} MiB, max {max(mem):.0f} MiB (nvidia-smi, "
                "every process on the GPU)")
        if self.problem:
            rows["GPU sampling stopped"] = self.problem
        return rows


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


# ---- BENCHMARKS.md sections ---------------------------------------------------------------
MARK = "<!-- section:{} -->"


def split_sections(text: str) -> dict[str, str]:
    """Sections keyed by name; each starts at its marker and runs to the next marker."""
    out, name, buf = {}, None, []
    for line in text.splitlines():
        if line.startswith("<!-- section:") and line.endswith("-->"):
            if name is not None:
                out[name] = "\n".join(buf).strip()
            name, buf = line[len("<!-- section:"):-len("-->")].strip(), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf).strip()
    return out


def write_sections(path: Path, order: list[str], new: dict[str, str], title: str) -> None:
    old = split_sections(path.read_text()) if path.exists() else {}
    merged = {**old, **new}
    parts = [title.strip(), ""]
    for name in order + sorted(set(merged) - set(order)):
        if name in merged:
            parts += [MARK.format(name), merged[name], ""]
    path.write_text("\n".join(parts))


SIMULATE = str(Path(PYTHON).with_name("fedmeta-simulate"))


def simulate_run(kind: str, overrides: list[str], timeout: float, prefix: str) -> dict:
    """One ``fedmeta-simulate runtime=<kind>`` run in a scratch run directory: its exit code,
    wall seconds, ``summary.json`` (None when it wrote none), everything it logged, and the
    command without the scratch directory (for the section's text)."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-{kind}-") as tmp:
        extra = simulation_overrides() if kind == "simulation" else []
        cmd = [SIMULATE, f"runtime={kind}", *overrides, *extra, f"hydra.run.dir={tmp}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        wall = time.perf_counter() - t0
        path = Path(tmp) / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else None
        logs = proc.stdout + proc.stderr + "".join(
            p.read_text(errors="replace") for p in Path(tmp).glob("*.log"))
    return {"proc": proc, "wall": wall, "summary": summary, "logs": logs,
            "cmd": shlex.join(cmd[:-1])}
