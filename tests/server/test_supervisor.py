"""``reap_descendants``: a command must not return while processes it started are still exiting."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from server.supervisor import _subreaper, reap_descendants

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="child subreapers are Linux-only")


def _orphan(seconds: float) -> int:
    """A child that starts a grandchild and exits at once, orphaning it (as the raylet's
    workers are when Ray shuts down); returns the grandchild's pid."""
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep({seconds})'], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(p.pid)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def test_an_orphan_is_waited_for_and_reaped_before_the_block_ends():
    was = _subreaper()
    t0 = time.monotonic()
    with reap_descendants(grace=30):
        pid = _orphan(1.5)
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert time.monotonic() - t0 >= 1.4          # it waited for the orphan to finish
    assert not psutil.pid_exists(pid)            # neither running nor left as a zombie
    assert _subreaper() == was                   # the flag is put back


def test_an_orphan_that_outlives_the_grace_period_is_killed_and_reaped():
    t0 = time.monotonic()
    with reap_descendants(grace=1):
        pid = _orphan(120)
    assert not psutil.pid_exists(pid)
    assert time.monotonic() - t0 < 60
