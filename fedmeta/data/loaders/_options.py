"""Options every loader accepts, applied in one place after the source is read.

A loader reads files; what a user wants done to *any* source (a smaller sample of users, a
stance on a useless clock, a per-source minimum history) should not be re-implemented per
format. :func:`source_loader` wraps each public ``load_*`` function so these keyword options
exist on all of them, whether called directly, through ``load_source`` or ``load_packaged``
(``data.real[i].options`` in the config), and so that each source ends with one INFO line
saying what was kept and what was dropped.

Options (all keyword-only):

``on_equal_timestamps``: ``warn`` (default) | ``error`` | ``row_order``
    What to do with a domain whose clock cannot order anything: all its timestamps are equal,
    or every user with several interactions has a single distinct timestamp (e.g. one date per
    user). ``warn`` logs a WARNING, ``error`` raises :class:`DataError`, ``row_order`` replaces
    that domain's clock with file row order (0, 1, 2, ...) and says so in a WARNING.
``min_interactions``: int >= 1, default none
    Drop this source's users with fewer interactions (per domain) *before* subsampling, so
    ``max_users`` counts only users the run will keep. ``data.min_interactions`` still applies
    to all sources afterwards.
``max_users``: int >= 1 / ``user_fraction``: float in (0, 1]
    Keep a random subset of each domain's users (all of their interactions); at most one of
    the two. Users are sorted before drawing, so the sample depends only on the user ids,
    ``subsample_seed`` (int, default 0) and the domain name, not on file order. The item
    catalogue is kept whole (unrated items stay ranking candidates).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import zlib

import numpy as np
import pandas as pd

from fedmeta.data.loaders._finish import REPORT
from fedmeta.data.schema import DataError, InteractionData

log = logging.getLogger("fedmeta.data.loaders")

EQUAL_TIMESTAMP_POLICIES = ("warn", "error", "row_order")
_DEFAULTS = {"on_equal_timestamps": "warn", "min_interactions": None, "max_users": None,
             "user_fraction": None, "subsample_seed": 0}
SHARED_OPTIONS = tuple(_DEFAULTS)


class OptionError(DataError, TypeError):
    """A bad value for a loader option.

    Also a ``TypeError`` because, like an unknown option, it is a bad call: the config layer
    turns TypeErrors from loaders into errors naming the ``data.real[i].options`` entry.
    """


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_options(on_equal_timestamps, min_interactions, max_users, user_fraction,
                   subsample_seed) -> None:
    def bad(name, why, value):
        raise OptionError(f"option {name}={value!r}: {why}")

    if on_equal_timestamps not in EQUAL_TIMESTAMP_POLICIES:
        bad("on_equal_timestamps", f"must be one of {list(EQUAL_TIMESTAMP_POLICIES)}",
            on_equal_timestamps)
    if min_interactions is not None and not (_is_int(min_interactions) and min_interactions >= 1):
        bad("min_interactions", "must be an integer >= 1", min_interactions)
    if max_users is not None and not (_is_int(max_users) and max_users >= 1):
        bad("max_users", "must be an integer >= 1", max_users)
    if user_fraction is not None:
        ok = isinstance(user_fraction, (int, float)) and not isinstance(user_fraction, bool)
        if not (ok and 0 < user_fraction <= 1):
            bad("user_fraction", "must be a number in (0, 1]", user_fraction)
    if max_users is not None and user_fraction is not None:
        bad("user_fraction", "give max_users or user_fraction, not both", user_fraction)
    if not _is_int(subsample_seed):
        bad("subsample_seed", "must be an integer", subsample_seed)


def _clock_problem(inter: pd.DataFrame) -> str | None:
    """Why this domain's timestamps cannot order its interactions, or None if they can."""
    ts = inter["timestamp"]
    if len(inter) > 1 and ts.nunique() == 1:
        return f"all {len(inter)} interactions have the same timestamp {ts.iloc[0]:g}"
    per_user = inter.groupby("user", sort=False)["timestamp"].agg(["size", "nunique"])
    several = per_user[per_user["size"] > 1]
    if len(several) and (several["nunique"] == 1).all():
        return (f"each of the {len(several)} users with several interactions has a single "
                f"distinct timestamp")
    return None


def _apply_clock_policy(inter: pd.DataFrame, policy: str, source: str, domain: str,
                        report: dict) -> pd.DataFrame:
    problem = _clock_problem(inter)
    if problem is None:
        return inter
    where = f"{source}: domain '{domain}'"
    if policy == "error":
        raise DataError(f"domain '{domain}': {problem}, so nothing can be ordered in time "
                        f"(on_equal_timestamps=error)", source, column="timestamp")
    if policy == "row_order":
        log.warning("%s: %s; replacing the clock with file row order (on_equal_timestamps="
                    "row_order)", where, problem)
        report["clock"] = "file row order (on_equal_timestamps=row_order)"
        return inter.assign(timestamp=np.arange(len(inter), dtype=float))
    log.warning("%s: %s; users' sequences fall back to file order and temporal splits mean "
                "nothing (set on_equal_timestamps to row_order or error)", where, problem)
    return inter


def _subsample(inter: pd.DataFrame, domain: str, max_users, user_fraction, seed
               ) -> pd.DataFrame:
    users = np.sort(inter["user"].unique())
    n_keep = (max_users if max_users is not None
              else max(1, math.ceil(user_fraction * len(users))))
    if n_keep >= len(users):
        return inter
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    keep = users[rng.choice(len(users), n_keep, replace=False)]
    return inter[inter["user"].isin(keep)]


def _apply(data: InteractionData, kind: str, report: dict, on_equal_timestamps,
           min_interactions, max_users, user_fraction, subsample_seed) -> InteractionData:
    source = report.get("source", kind)
    parts = []
    for domain in data.domains:
        inter = data.interactions[data.interactions["domain"] == domain]
        inter = _apply_clock_policy(inter, on_equal_timestamps, source, domain, report)
        n_users, n_rows = inter["user"].nunique(), len(inter)
        if min_interactions is not None:
            inter = inter[inter.groupby("user")["user"].transform("size") >= min_interactions]
            if inter.empty:
                raise DataError(f"domain '{domain}' has no user with at least "
                                f"{min_interactions} interactions (option min_interactions)",
                                source)
        short = (n_users - inter["user"].nunique(), n_rows - len(inter))
        n_users, n_rows = inter["user"].nunique(), len(inter)
        if max_users is not None or user_fraction is not None:
            inter = _subsample(inter, domain, max_users, user_fraction, subsample_seed)
        sampled = (n_users - inter["user"].nunique(), n_rows - len(inter))
        _summary(kind, source, domain, inter, data.items, report, short, min_interactions,
                 sampled, subsample_seed)
        parts.append(inter)
    inter = pd.concat(parts).sort_index().reset_index(drop=True)
    return InteractionData(inter, data.items)


def _summary(kind, source, domain, inter, items, report, short, min_interactions, sampled,
             seed) -> None:
    n_items = int((items["domain"] == domain).sum())
    dropped = [f"{report.get('duplicates', 0)} duplicate rows"]
    dropped.append(f"{short[0]} short users ({short[1]} interactions, min_interactions="
                   f"{min_interactions})" if min_interactions is not None
                   else "short users not filtered here (data.min_interactions applies later)")
    if "subsample" in report:
        dropped.append(f"{sampled[0]} users ({sampled[1]} interactions) by subsample "
                       f"{report['subsample']}, subsample_seed={seed}")
    clock = f"; clock: {report['clock']}" if "clock" in report else ""
    log.info("%s %s -> domain '%s': kept %d users, %d items (%d with interactions), "
             "%d interactions; dropped: %s; unknown items: %d added to the catalogue with "
             "empty text%s", kind, source, domain, inter["user"].nunique(), n_items,
             inter["item"].nunique(), len(inter), ", ".join(dropped),
             report.get("uncatalogued", 0), clock)


def source_loader(kind: str):
    """Give a ``load_*`` function the shared options and its summary line (see module doc)."""

    def wrap(fn):
        own = inspect.signature(fn).parameters
        clash = set(own) & set(SHARED_OPTIONS)
        if clash:
            raise TypeError(f"{fn.__name__} already defines shared option(s) {sorted(clash)}")
        valid = sorted([p for p in own if p != next(iter(own))] + list(SHARED_OPTIONS))

        @functools.wraps(fn)
        def load(*args, on_equal_timestamps: str = "warn", min_interactions: int | None = None,
                 max_users: int | None = None, user_fraction: float | None = None,
                 subsample_seed: int = 0, **kwargs) -> InteractionData:
            unknown = sorted(set(kwargs) - set(own))
            if unknown:  # TypeError, as Python would raise: the config layer names the entry
                raise TypeError(f"{fn.__name__}() got unknown option(s) {unknown}; valid "
                                f"options: {valid}")
            _check_options(on_equal_timestamps, min_interactions, max_users, user_fraction,
                           subsample_seed)
            report: dict = {}
            if max_users is not None:
                report["subsample"] = f"max_users={max_users}"
            elif user_fraction is not None:
                report["subsample"] = f"user_fraction={user_fraction}"
            token = REPORT.set(report)
            try:
                data = fn(*args, **kwargs)
            finally:
                REPORT.reset(token)
            return _apply(data, kind, report, on_equal_timestamps, min_interactions, max_users,
                          user_fraction, subsample_seed)

        load.__signature__ = inspect.Signature(list(own.values()) + [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in _DEFAULTS.items()])
        return load

    return wrap
