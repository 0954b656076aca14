"""Shared pieces of the benchmark: timing, fresh-process cells, machine facts, markdown.

Peak memory is read with ``resource.getrusage`` (max RSS) inside a fresh interpreter per
cell: torch allocates outside Python's allocator, so tracemalloc would miss most of it, and
a process that already ran a bigger cell would report that cell's peak.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


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


def run_cell(kind: str, spec: dict, timeout: float) -> dict:
    """Run ``bench.cell`` for one measurement in a fresh interpreter; JSON back on stdout."""
    cmd = [PYTHON, "-m", "bench.cell", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                  "OMP_NUM_THREADS", "1")})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:160]}"}
    return json.loads(lines[-1])


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
