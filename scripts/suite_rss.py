"""Peak memory of a command's whole process tree, and which test was running at the peak.

Why: the test suite starts Flower SuperLinks, SuperNodes and Ray clusters as subprocesses, so
the pytest process's own max RSS (what ``/usr/bin/time`` reports) says little about what the
machine has to hold. This samples every 0.5 s the resident memory of the command and all its
descendants -- and of any process carrying this run's tag in its environment, which catches
daemons that re-parent themselves away from the tree (Ray's raylet, a detached SuperNode).

Usage (from the repository root)::

    .venv/bin/python scripts/suite_rss.py --out outputs/suite_rss -- \
        .venv/bin/python -m pytest -q --durations=0

When the command is pytest, this file is also loaded into it as a plugin (``-p suite_rss``)
that writes the running test's node id to a file, so every sample knows its test. Writes
``timeline.csv`` (time, RSS sum, PSS sum, process count, test) and ``summary.json`` (peak,
the processes at the peak, the tests with the highest peaks and their processes) into ``--out`` and prints the
summary. RSS sums count shared pages once per process; PSS splits them, so it is the lower
and fairer figure when many forked workers share libraries. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG_VAR = "SUITE_RSS_TAG"
CURRENT_VAR = "SUITE_RSS_CURRENT"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- pytest plugin side
def _write_current(text: str) -> None:
    path = os.environ.get(CURRENT_VAR)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)


def pytest_runtest_logstart(nodeid, location):  # noqa: ARG001 - pytest hook signature
    _write_current(nodeid)


def pytest_runtest_logfinish(nodeid, location):  # noqa: ARG001
    _write_current(f"(after) {nodeid}")


# ---------------------------------------------------------------- sampler side
def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _tagged(pid: int, tag: bytes) -> bool:
    try:
        return tag in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _members(root: int, tag: bytes) -> list[int]:
    """The root, its descendants, and every process whose environment carries the tag."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pp = _ppid(int(entry))
            if pp is not None:
                parent[int(entry)] = pp
    members = set()
    for pid in parent:
        p, seen = pid, 0
        while p and seen < 64:
            if p == root:
                members.add(pid)
                break
            p, seen = parent.get(p, 0), seen + 1
    members.update(pid for pid in parent if pid not in members and _tagged(pid, tag))
    return sorted(members)


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; (0, 0) for a process that has gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0
    pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return rss, pss


def _cmd(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    return raw.strip()[:160]


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for timeline.csv and summary.json")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    args.out.mkdir(parents=True, exist_ok=True)
    current = args.out / "current_test.txt"
    current.write_text("(collecting)")
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VAR: tag, CURRENT_VAR: str(current.resolve())})
    if any("pytest" in part for part in cmd):
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        cmd = [*cmd, "-p", "suite_rss"]
    tag_bytes = f"{TAG_VAR}={tag}".encode()

    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    peak = {"rss": 0, "pss": 0, "t": 0.0, "test": "", "procs": []}
    peak_pss = {"pss": 0, "t": 0.0, "test": ""}
    per_test: dict[str, int] = {}
    per_test_procs: dict[str, list] = {}
    with open(args.out / "timeline.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["t_s", "rss_sum_mb", "pss_sum_mb", "processes", "test"])
        try:
            while proc.poll() is None:
                members = _members(proc.pid, tag_bytes)
                mem = {pid: _memory(pid) for pid in members}
                rss = sum(r for r, _ in mem.values())
                pss = sum(p for _, p in mem.values())
                try:
                    test = current.read_text()
                except OSError:
                    test = "?"
                t = time.monotonic() - start
                out.writerow([f"{t:.1f}", rss // 2**20, pss // 2**20, len(members), test])
                fh.flush()                  # readable while the run goes on
                key = test.removeprefix("(after) ")
                if rss > per_test.get(key, -1):
                    per_test[key] = rss
                    procs = sorted(((r, pid) for pid, (r, _) in mem.items()), reverse=True)
                    per_test_procs[key] = [{"pid": pid, "rss_mb": r // 2**20, "cmd": _cmd(pid)}
                                           for r, pid in procs[:15]]
                if rss > peak["rss"]:
                    peak = {"rss": rss, "pss": pss, "t": t, "test": test,
                            "procs": per_test_procs[key]}
                if pss > peak_pss["pss"]:
                    peak_pss = {"pss": pss, "t": t, "test": test}
                time.sleep(args.interval)
        except KeyboardInterrupt:
            proc.terminate()
        rc = proc.wait()
    wall = time.monotonic() - start
    top = sorted(per_test.items(), key=lambda kv: kv[1], reverse=True)[:25]
    summary = {
        "command": cmd, "exit_status": rc, "wall_s": round(wall, 1),
        "peak_rss_sum_mb": peak["rss"] // 2**20, "pss_at_rss_peak_mb": peak["pss"] // 2**20,
        "peak_rss_t_s": round(peak["t"], 1), "peak_rss_test": peak["test"],
        "peak_pss_sum_mb": peak_pss["pss"] // 2**20, "peak_pss_test": peak_pss["test"],
        "processes_at_peak": peak["procs"],
        "tests_by_peak_rss_mb": [{"test": k, "rss_mb": v // 2**20, "processes": per_test_procs[k]}
                                 for k, v in top],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[suite_rss] wall {wall:.0f} s, exit {rc}; peak RSS sum {_gb(peak['rss'])} "
          f"(PSS {_gb(peak['pss'])}) at {peak['t']:.0f} s during {peak['test']}; "
          f"peak PSS sum {_gb(peak_pss['pss'])} during {peak_pss['test']}", file=sys.stderr)
    for row in top[:10]:
        print(f"[suite_rss]   {row[1] / 2**30:5.2f} GB  {row[0]}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
