"""P4: wall time and peak RSS against number of clients and number of interactions.

Each cell (fresh process, ``bench.cell scale``) generates ``scaled`` synthetic data, builds
the federation and runs one training round over every client with fixed per-client work
(FedAvg, one local step of 8 users), so round time should grow linearly with clients and
not with interactions.
"""

from __future__ import annotations

from bench.common import run_cell, table


def grid(quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(2000, 2), (2000, 4), (4000, 2)]
    # the clients sweep at 100k interactions: at 10k, 128 clients hold ~75 interactions each
    # and many have no user with two training interactions (no task at all)
    cells = [(100_000, c) for c in (8, 32, 128)]
    cells += [(n, 32) for n in (10_000, 1_000_000)]
    return cells


def run(quick: bool, echo=print) -> str:
    rows, res = [], {}
    for n, c in grid(quick):
        r = run_cell("scale", {"interactions": n, "clients": c, "users_per_step": 8},
                     timeout=300)
        if "error" in r:
            rows.append([n, c, "failed", "", "", "", "", "", r["error"]])
            echo(f"P4 {n} x {c}: {r['error']}")
            continue
        res[(n, c)] = r
        rows.append([n, c, r["interactions"], r["data_s"] + r["build_s"], r["round_s"],
                     r["round_s"] / r["clients"] * 1000, r["peak_rss_mb"], r["largest_client_users"],
                     f"{r['without_tasks']} clients without tasks skipped" if r.get("without_tasks")
                     else ""])
        echo(f"P4 {n} x {c}: round {r['round_s']:.1f}s peak {r['peak_rss_mb']:.0f} MB")
    counts = [n for n, _ in res]
    mid = max(set(counts), key=counts.count) if res else None   # the clients sweep
    by_c = sorted((c, r) for (n, c), r in res.items() if n == mid)
    by_n = sorted((n, r) for (n, c), r in res.items() if c == (32 if not quick else 2))
    verdict = []
    if len(by_c) >= 2:
        (c0, r0), (c1, r1) = by_c[0], by_c[-1]
        growth = (r1["round_s"] / r0["round_s"]) / (c1 / c0)
        rss = r1["peak_rss_mb"] / r0["peak_rss_mb"]
        verdict.append(f"Round time from {c0} to {c1} clients grew x{r1['round_s'] / r0['round_s']:.2f} "
                       f"for x{c1 / c0:.0f} the work ({growth:.2f} of linear): "
                       f"{'about linear' if 0.6 <= growth <= 1.4 else 'not linear'}.")
        verdict.append(f"Peak RSS from {c0} to {c1} clients: x{rss:.2f} -> target 'peak RSS flat in "
                       f"the number of clients' **{'met' if rss <= 1.15 else 'missed'}**"
                       + ("" if rss <= 1.15 else f" ({rss - 1:+.0%})") + ".")
    if len(by_n) >= 2:
        (n0, r0), (n1, r1) = by_n[0], by_n[-1]
        verdict.append(f"From {n0:,} to {n1:,} interactions (same clients) peak RSS went "
                       f"{r0['peak_rss_mb']:.0f} -> {r1['peak_rss_mb']:.0f} MB and the round "
                       f"{r0['round_s']:.2f} -> {r1['round_s']:.2f} s. Memory is *not* bounded by "
                       "the largest client: one process holds the whole data set and every "
                       "client's tasks (the in-process runtime builds all clients up front), and a "
                       "Flower SuperNode does the same today (it rebuilds the whole federation "
                       "from config and keeps only its own client's work); building only the "
                       "node's own partition is what would give the bound.")
    return "\n".join([
        "## P4 Scale",
        "",
        "One fresh process per cell: `scaled` synthetic data (both domains), federation build, "
        "then one training round over all clients (FedAvg without DP, 1 local step of 8 users "
        "each, tiny model, one thread). Build time includes data generation.",
        "",
        "```", "fedmeta-bench --only P4", "```",
        "",
        table(["target interactions", "clients", "actual interactions", "build s", "round s",
               "ms per client", "peak RSS MB", "largest client users", "note"], rows),
        "",
        *[f"- {v}" for v in verdict],
    ])
