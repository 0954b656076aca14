"""Where P3's time goes: torch profiler over one batch of second-order MAML meta-gradients,
vmapped vs a Python loop over users (``python -m bench.profile_p3 [users]``).

Prints total self CPU time, the number of operator calls and the top operators of each,
so the P3 ratio can be read against what each path actually executes. It runs on the bench
device (``FEDMETA_BENCH_DEVICE``, cpu unless set); on CUDA it also profiles the kernels and
prints their device time.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import on_cuda, synchronize
from bench.p3_maml import batch_of, loop_updates, setup


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    users = int(argv[0]) if argv else 64
    torch.set_num_threads(1)
    fed, client, params = setup()
    algo = fed.algorithm
    batch = batch_of(fed, client, users)
    algo.directions(params, batch)                         # warm-up every path
    algo.user_updates(params, batch)
    loop_updates(algo, params, batch_of(fed, client, 2))
    for name, fn in [("vmap", lambda: algo.directions(params, batch)),
                     ("vmap, whole table", lambda: algo.user_updates(params, batch)),
                     ("loop", lambda: loop_updates(algo, params, batch))]:
        cuda = on_cuda()
        with profile(activities=[ProfilerActivity.CPU]
                     + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            synchronize()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        gpu = (f", self device {sum(e.self_device_time_total for e in events) / 1e6:.2f} s"
               if cuda else "")
        print(f"{name}: {users} users, self CPU {total:.2f} s{gpu}, "
              f"{sum(e.count for e in events)} operator calls")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {e.key[:36]:36s} {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:7d} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
