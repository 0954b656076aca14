"""Text -> string columns indexed by file line, and the located conversions on top of them.

Every reader parses its files as strings first and keeps the 1-based file line number of
each row as the frame index until the values are converted. That is what lets a bad value
be reported as ``file:line, column 'x'`` instead of a bare pandas traceback, while the
conversions themselves stay vectorised (the Instacart sample has 150k lines).
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.schema import DataError

_SEP = "\x1f"  # stands in for multi-character separators ("::") so the C parser can be used
_INT_FLOAT = r"^(-?\d+)\.0+$"  # "38.0" and "38" must be the same id
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what the pandas C parser ends a line on


def read_text(path: Path, encodings: tuple[str, ...] = ("utf-8-sig",)) -> str:
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


def _field_counts_plain(text: str, sep: str) -> tuple[np.ndarray, np.ndarray]:
    """Quote-free field counts from the UTF-8 bytes; a line ends at LF, CRLF or a lone CR."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    code = sep.encode("utf-8")
    if len(code) != 1:  # a non-ASCII separator: count characters instead (slower)
        lines = pd.Series(_LINE_BREAK.split(text))
        keep = (lines != "").to_numpy()
        counts = lines.str.count(re.escape(sep)).to_numpy() + 1
        return np.flatnonzero(keep) + 1, counts[keep]
    lf, cr = raw == 10, raw == 13
    end = lf | (cr & ~np.append(lf[1:], False))
    ends = np.flatnonzero(end)
    if len(raw) and not end[-1]:
        ends = np.append(ends, len(raw))
    starts = np.insert(ends[:-1] + 1, 0, 0)
    counts = np.bincount(np.searchsorted(ends, np.flatnonzero(raw == code[0])),
                         minlength=len(ends)) + 1
    inner = (ends > starts) & (ends < len(raw))
    crlf = np.zeros(len(ends), dtype=bool)  # the \r of a \r\n is not line content
    crlf[inner] = cr[ends[inner] - 1] & lf[ends[inner]]
    keep = ends - starts - crlf > 0
    return np.flatnonzero(keep) + 1, counts[keep]


def _field_counts(text: str, sep: str, quoting: int) -> tuple[np.ndarray, np.ndarray]:
    """(1-based line, number of fields) of every non-blank record of ``text``.

    pandas pads a short row with empty strings without a word, so the count is taken here.
    Quote-free text is counted line by line (vectorised); text with quotes goes through the
    csv module so a quoted separator or line break is not miscounted.
    """
    if quoting == csv.QUOTE_NONE or '"' not in text:
        return _field_counts_plain(text, sep)
    starts, counts, line = [], [], 1
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    for record in reader:
        if record:
            starts.append(line)
            counts.append(len(record))
        line = reader.line_num + 1
    return np.asarray(starts, dtype=int), np.asarray(counts, dtype=int)


def table(path: Path, sep: str, *, header: bool = False, names: list[str] | None = None,
          skip: int = 0, text: str | None = None, quoting: int = csv.QUOTE_NONE,
          encodings: tuple[str, ...] = ("utf-8-sig",)) -> pd.DataFrame:
    """Parse a delimited file into string columns indexed by 1-based file line number.

    ``header``: the first line after ``skip`` holds the column names; ``names``: the file has
    no header and every row must have exactly these fields. Without either, every row must
    have as many fields as the first one. Blank lines are dropped (they are not data).
    Line numbers are exact unless a quoted field spans several lines.
    """
    if header and names is not None:
        raise ValueError("give header=True or names, not both")
    text = read_text(path, encodings) if text is None else text
    if len(sep) > 1:
        text, sep = text.replace(sep, _SEP), _SEP
    lines, counts = _field_counts(text, sep, quoting)
    body = lines > skip
    lines, counts = lines[body], counts[body]
    if len(lines) == 0 or (header and len(lines) == 1):
        raise DataError("no data rows", str(path))
    expected = len(names) if names is not None else int(counts[0])
    off = np.flatnonzero(counts != expected)
    if len(off):
        why = (f"names {names}" if names is not None else "as in the header" if header
               else f"as on line {lines[0]}")
        raise DataError(f"expected {expected} fields, found {counts[off[0]]} ({why})",
                        str(path), int(lines[off[0]]))
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=0 if header else None, skiprows=skip,
                         dtype=str, keep_default_na=False, na_filter=False,
                         skip_blank_lines=False, quoting=quoting, index_col=False)
    except pd.errors.ParserError as err:  # the field counts above make this rare
        raise DataError(f"cannot parse: {err}", str(path)) from None
    first = skip + (2 if header else 1)
    df.index = pd.RangeIndex(first, first + len(df))
    if names is not None:
        df.columns = names
    df = df[~(df == "").all(axis=1)]
    if df.empty:
        raise DataError("no data rows", str(path))
    return df


def need(df: pd.DataFrame, cols: list[str], path: Path, line: int = 1) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {list(df.columns)}", str(path), line,
                        missing[0])


def fail(df: pd.DataFrame, bad: pd.Series, col: str, path: Path, why: str) -> None:
    """Raise for the first flagged row, quoting its value; ``bad`` aligns with ``df``."""
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{why} {df[col].iloc[pos]!r}", str(path), int(df.index[pos]), col)


def ids(df: pd.DataFrame, col: str, path: Path, missing: tuple[str, ...] = ("",)) -> pd.Series:
    s = df[col].str.strip().str.replace(_INT_FLOAT, r"\1", regex=True)
    fail(df, s.isin(list(missing)), col, path, "missing id")
    return s.astype(object)


def numbers(df: pd.DataFrame, col: str, path: Path, what: str = "number") -> pd.Series:
    num = pd.to_numeric(df[col].str.strip(), errors="coerce").astype(float)
    fail(df, ~np.isfinite(num), col, path, f"cannot parse as {what}:")
    return num


def times(df: pd.DataFrame, col: str, path: Path, fmt: str | None = None) -> pd.Series:
    """Seconds as float: numbers are taken as they are, anything else is parsed as a datetime.

    Without ``fmt`` the first value decides: numeric clock or datetimes (naive ones are UTC).
    """
    s = df[col].str.strip()
    if fmt is None and not pd.isna(pd.to_numeric(s.iloc[0], errors="coerce")):
        return numbers(df, col, path, "timestamp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dt = pd.to_datetime(s, format=fmt, errors="coerce", utc=True)
        retry = dt.isna() & (s != "")
        if fmt is None and retry.any():
            dt[retry] = pd.to_datetime(s[retry], format="mixed", errors="coerce", utc=True)
    fail(df, dt.isna(), col, path,
         "cannot parse as timestamp" + (f" (format {fmt!r}):" if fmt else ":"))
    return (dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)


def unique_items(items: pd.DataFrame, path: Path) -> pd.DataFrame:
    fail(items, items["item"].duplicated(), "item", path, "item listed twice:")
    return items


def interactions(user, item, timestamp, event, value) -> pd.DataFrame:
    return pd.DataFrame({"user": user, "item": item, "timestamp": timestamp, "event": event,
                         "value": value})
