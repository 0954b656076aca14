"""Orange ``.tab`` files and the two data sets shipped in that format (FilmTrust, Epinions).

None of them carries timestamps, so each gets a clock made from file row order; that is an
assumption the downstream temporal splits inherit, so it is always logged as a WARNING naming
the file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.loaders._finish import finish, note, row_clock
from fedmeta.data.loaders._options import source_loader
from fedmeta.data.loaders._parse import ids, need, numbers, read_text, table, times
from fedmeta.data.schema import DataError, InteractionData

log = logging.getLogger("fedmeta.data.loaders")


def _orange(path: Path, user_col=None, item_col=None, value_col=None, time_col=None
            ) -> tuple[pd.DataFrame, bool]:
    """Orange ``.tab`` -> frame of user, item, value, timestamp (NaN without a time column).

    Columns not named explicitly are found from the header flags the Orange recommendation
    add-on uses (``row=1`` user, ``col=1`` item, ``class`` value, type ``time``), then by name.
    """
    text = read_text(path)
    head = re.split(r"\r\n|\r|\n", text, maxsplit=3)
    if len(head) < 4:
        raise DataError("expected three header lines (names, types, flags) and data", str(path))
    names, types, flags = (h.split("\t") for h in head[:3])
    types, flags = [t.strip() for t in types], [f.strip() for f in flags]
    if all(not pd.isna(pd.to_numeric(t, errors="coerce")) for t in types):
        raise DataError("line 2 looks like data; expected the Orange types line "
                        "(continuous/discrete/string/time)", str(path), 2)
    names = [n.strip() for n in names]
    df = table(path, "\t", names=names, skip=3, text=text)

    def pick(given, flag, type_names, candidates):
        if given is not None:
            return given
        for i, name in enumerate(names):
            if (i < len(flags) and flag and flag in flags[i].split()) or \
                    (i < len(types) and types[i] in type_names):
                return name
        return next((c for c in candidates if c in names), None)

    user = pick(user_col, "row=1", (), ("user", "user_id", "userid"))
    item = pick(item_col, "col=1", (), ("item", "items", "item_id", "movie", "product"))
    value = pick(value_col, "class", (), ("score", "rating", "relevance", "value"))
    time = pick(time_col, None, ("t", "time"), ("timestamp", "time"))
    for role, col in (("user", user), ("item", item)):
        if col is None:
            raise DataError(f"no {role} column: none flagged and none of the usual names; "
                            f"found {names}", str(path), 1, role)
    need(df, [c for c in (user, item, value, time) if c is not None], path)
    miss = ("", "?")
    out = pd.DataFrame({"user": ids(df, user, path, miss), "item": ids(df, item, path, miss)})
    out["value"] = 1.0 if value is None else numbers(df, value, path, "rating")
    out["timestamp"] = np.nan if time is None else times(df, time, path)
    if value is None:
        log.info("%s: no value column, every interaction gets value 1.0", path)
    return out, time is not None


@source_loader("orange_tab")
def load_orange_tab(path, user_col: str | None = None, item_col: str | None = None,
                    value_col: str | None = None, time_col: str | None = None,
                    domain: str | None = None, event: str = "rating") -> InteractionData:
    """One Orange recommendation ``.tab`` file (3 header lines, tab separated rows)."""
    path = Path(path)
    df, timed = _orange(path, user_col, item_col, value_col, time_col)
    if not timed:
        df["timestamp"] = row_clock(len(df), path)
    return finish(df.assign(event=event), None, domain or path.stem, path)


@source_loader("filmtrust")
def load_filmtrust(path_dir, domain: str = "filmtrust") -> InteractionData:
    """FilmTrust: movie ratings plus a trust network, as one social domain.

    Ratings are event ``rating`` on item ``movie:<id>``; trust edges are event ``follow`` on
    item ``user:<trustee>``. There are no timestamps, so a clock is built: each user's ratings
    keep file order and their trust edges (in file order) are spread evenly among them, users
    one after another in order of first appearance. Spreading, rather than putting all follows
    first or last, keeps any chronological split from sending every social edge to one side.
    """
    folder = Path(path_dir)
    if not folder.is_dir():
        raise DataError("FilmTrust path must be the directory holding ratings.tab and trust.tab",
                        str(folder))
    ratings, _ = _orange(folder / "ratings.tab", "user", "movie", "score")
    trust, _ = _orange(folder / "trust.tab", "truster", "trustee", "score")
    ratings["item"] = "movie:" + ratings["item"]
    trust["item"] = "user:" + trust["item"]
    ratings["event"], trust["event"] = "rating", "follow"
    ratings["_kind"], trust["_kind"] = 0, 1
    for part in (ratings, trust):
        by_user = part.groupby("user", sort=False)["user"]
        part["_pos"] = (by_user.cumcount() + 1) / (by_user.transform("size") + 1)
    both = pd.concat([ratings, trust], ignore_index=True)
    order = pd.unique(both["user"])
    both["_user"] = pd.Categorical(both["user"], categories=order).codes
    both = both.sort_values(["_user", "_pos", "_kind"], kind="stable")
    both["timestamp"] = np.arange(len(both), dtype=float)
    log.warning("%s has no timestamps: clock = per-user sequence of ratings in file order with "
                "trust edges spread evenly among them", folder)
    note(clock="per-user file order, trust edges spread among ratings")
    items = pd.concat([
        pd.DataFrame({"item": ratings["item"].unique(), "text": "", "kind": "movie"}),
        pd.DataFrame({"item": trust["item"].unique(), "text": "", "kind": "user"})])
    return finish(both[["user", "item", "timestamp", "event", "value"]], items, domain, folder)


@source_loader("epinions")
def load_epinions(path, domain: str = "epinions", event: str = "like") -> InteractionData:
    """Orange's Epinions binary relevance data (``user items relevance``).

    A directory means ``epinions_train.tab`` then ``epinions_test.tab`` (whichever exist),
    concatenated; their own split is not kept because fedmeta makes its own. No timestamps:
    the clock is row order across the files.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / n for n in ("epinions_train.tab", "epinions_test.tab")
                 if (path / n).is_file()]
        if not files:
            raise DataError("no epinions_train.tab or epinions_test.tab in directory", str(path))
    else:
        files = [path]
    frame = pd.concat([_orange(f)[0] for f in files], ignore_index=True)
    frame["timestamp"] = row_clock(len(frame), path, f" ({len(files)} file(s) in sequence)")
    return finish(frame.assign(event=event), None, domain, path)
