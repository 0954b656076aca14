"""Supervision of the Flower daemons ``fedmeta-deploy`` starts.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only ``fedmeta-deploy``,
which then stops the children in a known order instead of letting them race. Stopping signals the
child's process group *and* every descendant seen while it ran: SuperLink starts its
``flower-superexec`` detached (a new session), which a group signal alone would miss. Whatever
outlives the grace period gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import psutil

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised so that every ``finally`` stops the processes."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    family: dict[int, psutil.Process] = field(default_factory=dict)   # pid -> leader + descendants

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def refresh(self) -> None:
        """Remember descendants while the tree is intact: once a parent dies, orphans are
        re-parented and can no longer be found from the leader."""
        try:
            leader = psutil.Process(self.pid)
            for p in [leader, *leader.children(recursive=True)]:
                self.family.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Supervisor:
    """Owns child processes; ``stop_all`` (also run on leaving the ``with`` block) ends them all."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, grace: float = 10.0):
        self.log_dir = Path(log_dir)
        self.env = env
        self.grace = grace
        self.procs: list[Proc] = []
        self._hurry = False
        self._orphans: _Orphans | None = None

    def start(self, name: str, argv: Sequence[str], pipe: bool = False) -> Proc:
        """Start ``argv`` in a new session, output to ``<log_dir>/<name>.log`` (or a pipe)."""
        if self._orphans is None:
            # detached grandchildren (SuperLink's superexec) are re-parented to us, not PID 1,
            # so that stop_all can reap them: a container's PID 1 may never do it
            self._orphans = _Orphans()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        with open(path, "wb") as fh:
            popen = subprocess.Popen(list(argv), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipe else fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, path)
        self.procs.append(proc)
        proc.refresh()
        log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return proc

    def refresh(self) -> None:
        for p in self.procs:
            p.refresh()

    def stop(self, *procs: Proc, grace: float | None = None) -> None:
        """SIGTERM to each process group and every known descendant, all at once; SIGKILL to
        whatever outlives ``grace``. Leaders are polled through Popen (not psutil) so their exit
        codes are kept."""
        grace = self.grace if grace is None else grace
        plan = []
        for proc in procs:
            proc.refresh()
            others = [p for pid, p in proc.family.items() if pid != proc.pid and _running(p)]
            # the group id is still ours while the leader is unreaped or a member lives
            if proc.alive() or others:
                _signal_group(proc.pid, signal.SIGTERM)
            for p in others:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            plan.append((proc, others))
        deadline = time.monotonic() + grace
        while (time.monotonic() < deadline and not self._hurry
               and any(proc.alive() or any(map(_running, others)) for proc, others in plan)):
            time.sleep(0.05)
        for proc, others in plan:
            left = [p for p in others if _running(p)]
            if left or proc.alive():
                log.warning("%s did not stop within %.1f s: killing %s", proc.name, grace,
                            [p.pid for p in left] + ([proc.pid] if proc.alive() else []))
                _signal_group(proc.pid, signal.SIGKILL)
                for p in left:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            psutil.wait_procs(left, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()

    def stop_all(self) -> None:
        """Everything started after the first process together, then the first: the first is
        the hub (the SuperLink) that the others (SuperNodes, ``flwr run``) would otherwise
        keep retrying against. A second Ctrl-C while stopping skips the grace period."""
        self._hurry = False
        procs, self.procs = self.procs, []
        with _deferred_signals(self._hurry_up):
            self.stop(*reversed(procs[1:]))
            self.stop(*procs[:1])
            orphans, self._orphans = self._orphans, None
            if orphans is not None:
                # what the daemons started after we last looked (and left behind) is ours now
                orphans.end(1.0 if self._hurry else self.grace, terminate=True)

    def _hurry_up(self) -> None:
        self._hurry = True

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def raise_on_signals():
    """Turn SIGINT/SIGTERM into :class:`Interrupted` so cleanup runs (main thread only)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _deferred_signals(on_signal: Callable[[], None]):
    if not _in_main_thread():
        yield
        return
    old = {s: signal.signal(s, lambda *_: on_signal()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def _subreaper(on: bool | None = None) -> bool:
    """Linux's child-subreaper flag (orphaned descendants are re-parented to this process
    instead of PID 1): set it when ``on`` is given; return its previous value."""
    if os.uname().sysname != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
        if on is not None:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
        return bool(flag.value)
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def reap_descendants(grace: float = 30.0):
    """Wait for, and reap, every process started inside the block before leaving it.

    ``ray.shutdown()`` kills the raylet, whose workers then exit on their own a moment later,
    after their parent is gone: without this, a command can return while Ray workers are still
    exiting, and in a container whose PID 1 does not reap they linger as zombies. As a child
    subreaper this process inherits those orphans; it waits ``grace`` seconds for them, kills
    the rest and reaps them all. Processes that were already children before the block are left
    alone.
    """
    orphans = _Orphans()
    try:
        yield
    finally:
        orphans.end(grace)


class _Orphans:
    """Every process started from now on, adopted (as child subreaper) when its parent dies."""

    def __init__(self):
        me = psutil.Process()
        self.before = {p.pid for p in me.children(recursive=True)}
        self.was = _subreaper(True)

    def end(self, grace: float, terminate: bool = False) -> None:
        """Wait ``grace`` seconds (after SIGTERM if ``terminate``) for them, SIGKILL the rest,
        reap them all, and put the subreaper flag back."""
        try:
            self._end(grace, terminate)
        finally:
            _subreaper(self.was)

    def _end(self, grace: float, terminate: bool) -> None:
        me = psutil.Process()
        deadline = time.monotonic() + grace
        killed, signalled = False, set()
        while True:
            # listed again each pass: orphans are re-parented to us as their parents exit
            left = [p for p in me.children(recursive=True) if p.pid not in self.before]
            if not left:
                return
            for p in left:
                if terminate and p.pid not in signalled:
                    signalled.add(p.pid)
                    with contextlib.suppress(psutil.Error):
                        p.terminate()
            if time.monotonic() >= deadline:
                if killed:
                    log.warning("processes %s survived SIGKILL", [p.pid for p in left])
                    return
                log.warning("%d processes did not exit within %.0f s: killing %s", len(left),
                            grace, [p.pid for p in left])
                for p in left:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                killed, deadline = True, time.monotonic() + 5
            _reap(left, timeout=0.5)


def _reap(procs: Sequence[psutil.Process], timeout: float) -> None:
    """Wait up to ``timeout`` for ``procs`` to end; collect those that are (or become, once
    re-parented) our children. psutil's own wait stops trying ``waitpid`` on a process that
    was not our child when it started waiting, so an orphan handed to us later stays a zombie."""
    pending = {p.pid: p for p in procs}
    deadline = time.monotonic() + timeout
    while pending:
        for pid, p in list(pending.items()):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    del pending[pid]
                continue
            except ChildProcessError:
                pass                                  # not ours (yet): is it still there?
            try:
                if not p.is_running():
                    del pending[pid]
            except psutil.Error:
                del pending[pid]
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.05)
