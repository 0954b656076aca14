"""The peer simulator's own venv under ``.bench/`` (git-ignored), made on first use.

pfl 0.6 pins ``dp-accounting<0.6`` and ``packaging<26``, which fedmeta's stack does not
satisfy, so it cannot be a project dependency; a separate venv keeps both intact. torch goes
in first and pinned to fedmeta's own build (here the local CPU wheel): left to pfl's
``torch>=2.0.1``, pip would fetch the multi-GB CUDA build, and the comparison would be
between two torch builds instead of two simulators. transformers, pandas and numpy are
pinned to fedmeta's versions for the same reason (they run fedmeta's model and data code).

Idempotent: a marker file records the requirements a finished install satisfied; the next
call with the same requirements only checks that the interpreter still imports pfl.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.common import REPO

VENV = REPO / ".bench" / "pfl-venv"
PEER = "pfl[pytorch]==0.6.0"
MARKER = ".p5-requirements.json"
SHARED = ("transformers", "pandas", "numpy")   # fedmeta's versions, imported by its modules


class PeerUnavailable(RuntimeError):
    """The peer's venv could not be made; the message carries the command and pip's error."""


def requirements() -> list[list[str]]:
    """Install steps, in order: torch alone first, then the peer and fedmeta's shared libs."""
    try:
        pins = [f"{name}=={version(name)}" for name in SHARED]
        torch = f"torch=={version('torch')}"
    except PackageNotFoundError as err:
        raise PeerUnavailable(f"fedmeta's venv lacks {err.name}") from err
    return [[torch], [PEER, *pins]]


def python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def ready(venv: Path = VENV, steps: list[list[str]] | None = None) -> bool:
    """True when a finished install with these requirements is there (no pip call)."""
    marker = venv / MARKER
    if not marker.exists() or not python(venv).exists():
        return False
    try:
        return json.loads(marker.read_text()) == (steps or requirements())
    except (OSError, ValueError):
        return False


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f}s "
                                  f"(log: {log})") from None
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln] or lines[-1:]
        raise PeerUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: "
                              f"{errors[-1].strip()[:300]} (log: {log})")


def make_venv(venv: Path, steps: list[list[str]], probe: str, name: str, echo=print,
              timeout: float = 1800) -> dict:
    """Make (or reuse) a peer's venv: reused when its marker records these very ``steps``
    and ``probe`` (an import line) runs in it; else rebuilt, logged to ``<name>-install.log``
    beside it. Returns whether it installed and the exact commands, for the report."""
    pip = [str(python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    commands = [f"{sys.executable} -m venv {venv}"] + [" ".join([*pip, *st]) for st in steps]
    if ready(venv, steps):
        check = subprocess.run([str(python(venv)), "-c", probe], capture_output=True, text=True)
        if check.returncode == 0:
            return {"installed": False, "commands": commands}
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{name}-install.log"
    log.write_text("")
    echo(f"installing {name} into {venv} (log: {log}); commands:")
    for c in commands:
        echo(f"  {c}")
    (venv / MARKER).unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], log, timeout)
    for st in steps:
        _run([*pip, *st], log, timeout)
    (venv / MARKER).write_text(json.dumps(steps))
    return {"installed": True, "commands": commands}


def ensure(venv: Path = VENV, echo=print, timeout: float = 1800) -> dict:
    """pfl's venv (:func:`make_venv` with pfl's requirements)."""
    return make_venv(venv, requirements(), "import pfl, torch", "pfl", echo, timeout)
