"""Any delimited file the user brings, told which column plays which role.

Two layouts are common: a header naming the columns, and headerless files in a fixed order
(MovieLens ``u.data``: ``user item rating time``), for which the config gives the names. In
both cases the ``columns`` mapping speaks of the names, so switching layouts changes one
option, not the mapping.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from fedmeta.data.loaders._finish import finish, row_clock
from fedmeta.data.loaders._options import source_loader
from fedmeta.data.loaders._parse import (ids, interactions, need, numbers, table, times,
                                         unique_items)
from fedmeta.data.schema import DataError, InteractionData

_CSV_KEYS = {"user", "item", "timestamp", "value", "rating", "event"}


def _names(names, header: bool, path: Path, option: str) -> list[str] | None:
    """Check the ``names`` option against ``header``: names are for headerless files only."""
    if header:
        if names is not None:
            raise DataError(f"{option} is for headerless files; set header: false to use it, or "
                            f"drop it to read the names from the header line", str(path))
        return None
    if names is None:
        raise DataError(f"header: false needs {option} (the column names, in file order)",
                        str(path))
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"{option} must be a list of non-empty strings, got {names!r}",
                        str(path))
    names = [n.strip() for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{option} repeats {twice}", str(path), column=twice[0])
    return names


def _read(path: Path, sep: str, header: bool, names) -> pd.DataFrame:
    if header:
        return table(path, sep, header=True, quoting=csv.QUOTE_MINIMAL)
    return table(path, sep, names=names, quoting=csv.QUOTE_MINIMAL)


@source_loader("csv")
def load_csv(path, columns: dict, sep: str = ",", domain: str | None = None,
             items_path=None, item_columns: dict | None = None,
             timestamp_format: str | None = None, event: str | None = None,
             header: bool = True, names: list[str] | None = None,
             items_header: bool = True, items_names: list[str] | None = None
             ) -> InteractionData:
    """Any delimited file, given which column plays which role.

    ``columns`` maps ``user`` and ``item`` (required) and optionally ``timestamp``,
    ``value``/``rating`` and ``event`` to column names: the header's, or with
    ``header=False`` the ``names`` given for the file's fields in order (every row must then
    have exactly that many fields). Without a timestamp column the clock is file row order
    (logged as a WARNING). Without an event column every row gets ``event`` (default
    ``"rating"`` if a value column is mapped, else ``"view"``); without a value column values
    are 1.0. ``item_columns`` maps ``item`` and optionally ``text`` plus attribute names to
    columns of ``items_path`` (same separator; ``items_header``/``items_names`` as above).
    """
    path = Path(path)
    columns = dict(columns)
    unknown = sorted(set(columns) - _CSV_KEYS)
    if unknown:
        raise DataError(f"unknown key(s) {unknown} in columns mapping (allowed "
                        f"{sorted(_CSV_KEYS)})", str(path), column=unknown[0])
    for key in ("user", "item"):
        if key not in columns:
            raise DataError(f"columns mapping needs key {key!r} (got {columns})", str(path),
                            column=key)
    if "value" in columns and "rating" in columns:
        raise DataError("map either 'value' or 'rating', not both", str(path), column="rating")
    names = _names(names, header, path, "names")
    if names is not None:
        absent = [c for c in columns.values() if c not in names]
        if absent:
            raise DataError(f"columns mapping refers to {absent}, not among names {names}",
                            str(path), column=absent[0])
    df = _read(path, sep, header, names)
    need(df, list(columns.values()), path)
    vcol = columns.get("value", columns.get("rating"))
    value = 1.0 if vcol is None else numbers(df, vcol, path, "rating")
    if "event" in columns:
        ev = ids(df, columns["event"], path)
    else:
        ev = event or ("rating" if vcol is not None else "view")
    if "timestamp" in columns:
        ts = times(df, columns["timestamp"], path, timestamp_format)
    else:
        if timestamp_format is not None:
            raise DataError("timestamp_format given but no 'timestamp' column is mapped",
                            str(path), column="timestamp")
        ts = row_clock(len(df), path, " (no 'timestamp' in the columns mapping)")
    inter = interactions(ids(df, columns["user"], path), ids(df, columns["item"], path), ts,
                         ev, value)
    items = None
    if items_path is not None:
        items = _item_table(Path(items_path), sep, item_columns, items_header, items_names)
    elif item_columns or items_names is not None:
        raise DataError("item_columns/items_names given without items_path", str(path))
    return finish(inter, items, domain or path.stem, path)


def _item_table(path: Path, sep: str, item_columns: dict | None, header: bool, names
                ) -> pd.DataFrame:
    if not item_columns or "item" not in item_columns:
        raise DataError("items_path needs item_columns with at least an 'item' key", str(path),
                        column="item")
    item_columns = dict(item_columns)
    names = _names(names, header, path, "items_names")
    idf = _read(path, sep, header, names)
    need(idf, list(item_columns.values()), path)
    items = pd.DataFrame({"item": ids(idf, item_columns["item"], path)}, index=idf.index)
    for key, col in item_columns.items():
        if key != "item":
            items[key] = idf[col].str.strip()
    if "text" not in items:
        items["text"] = ""
    return unique_items(items, path)
