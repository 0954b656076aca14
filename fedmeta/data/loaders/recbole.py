"""RecBole atomic files: tab separated, one ``name:type`` header, space-separated sequences.

The declared types are checked on every value, because RecBole's own loader would coerce a
bad ``float`` silently to NaN and the model would learn from it. How each item field maps to
the schema (which only knows text and categorical attributes):

* a ``token``/``token_seq`` field whose name looks textual (``movie_title``, ``name``,
  ``description`` ...) becomes the item text, its words joined by single spaces; several such
  fields are joined with ``". "``;
* any other ``token_seq`` becomes a multi-valued attribute, every token kept, joined with
  ``|`` (the separator the featuriser splits on), e.g. ``class`` -> ``Action|Drama``;
* ``token`` and ``float`` fields become single-valued attributes (a float's trailing ``.0`` is
  dropped, so ``1994.0`` and ``1994`` are one category);
* ``float_seq`` fields (vectors) have no categorical reading: checked, then left out, logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.loaders._finish import finish, row_clock
from fedmeta.data.loaders._options import source_loader
from fedmeta.data.loaders._parse import (_INT_FLOAT, ids, interactions, need, numbers,
                                         table, times, unique_items)
from fedmeta.data.schema import DataError, InteractionData

log = logging.getLogger("fedmeta.data.loaders")

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
_TEXT_HINTS = ("title", "name", "text", "desc", "review", "summary")


def _check_floats(df: pd.DataFrame, col: str, seq: bool, path: Path) -> None:
    """Every non-empty value (every space-separated part, for ``float_seq``) is a finite number."""
    s = df[col].str.strip()
    parts = s.str.split().explode().dropna() if seq else s[s != ""]
    num = pd.to_numeric(parts, errors="coerce").astype(float)
    bad = ~np.isfinite(num.to_numpy())
    if bad.any():
        line = int(parts.index[np.flatnonzero(bad)[0]])
        part = parts.to_numpy()[np.flatnonzero(bad)[0]]
        what = (f"{part!r} in {df.at[line, col]!r} is not a number" if seq
                else f"{part!r} is not a number")
        raise DataError(f"declared {'float_seq' if seq else 'float'}, but {what}", str(path),
                        line, col)


def atomic(path: Path, converted: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole atomic file -> (frame with the field names as columns, name -> type).

    ``converted`` names fields the caller parses itself (rating, timestamp), with errors just
    as located, so they are not checked twice.
    """
    df = table(path, "\t", header=True)
    types: dict[str, str] = {}
    for col in df.columns:
        name, _, typ = (part.strip() for part in str(col).rpartition(":"))
        if not name or typ not in ATOMIC_TYPES:
            raise DataError(f"header field {col!r} is not 'name:type' with type in "
                            f"{list(ATOMIC_TYPES)}", str(path), 1, str(col))
        if name in types:
            raise DataError(f"field {name!r} declared twice in the header", str(path), 1, name)
        types[name] = typ
    df.columns = list(types)
    for name, typ in types.items():
        if typ.startswith("float") and name not in converted:
            _check_floats(df, name, typ == "float_seq", path)
    return df, types


def _resolve(path: Path, dataset: str | None) -> tuple[Path, str]:
    if path.is_file():
        return path.parent, dataset or path.stem
    if not path.is_dir():
        raise DataError("path not found", str(path))
    if dataset is None:
        found = sorted(p.stem for p in path.glob("*.inter"))
        dataset = path.name if path.name in found else (found[0] if len(found) == 1 else None)
        if dataset is None:
            raise DataError(f"cannot tell which dataset to load: .inter files {found}; pass "
                            f"dataset=", str(path))
    return path, dataset


@source_loader("recbole")
def load_recbole(path, dataset: str | None = None, domain: str | None = None,
                 fields: dict[str, str] | None = None) -> InteractionData:
    """RecBole atomic files ``<dataset>.inter`` (+ optional ``.item``, ``.user``).

    ``fields`` renames the RecBole defaults (``user_id``, ``item_id``, ``rating``,
    ``timestamp``) like RecBole's ``USER_ID_FIELD`` and friends. Item fields map to text and
    attributes as the module docstring says. Other ``.inter`` fields and user features have
    no place in the schema: their types are checked, then they are only counted.
    """
    path = Path(path)
    f = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp",
         **(fields or {})}
    folder, dataset = _resolve(path, dataset)
    inter_path = folder / f"{dataset}.inter"
    df, types = atomic(inter_path, (f["rating"], f["timestamp"]))
    need(df, [f["user"], f["item"]], inter_path)
    ts = (times(df, f["timestamp"], inter_path) if f["timestamp"] in df.columns
          else row_clock(len(df), inter_path))
    if f["rating"] in df.columns:
        event, value = "rating", numbers(df, f["rating"], inter_path, "rating")
    else:
        event, value = "view", 1.0
    unused = sorted(set(types) - {f["user"], f["item"], f["rating"], f["timestamp"]})
    if unused:
        log.info("%s: fields %s are not used (the schema has no place for them)", inter_path,
                 unused)
    inter = interactions(ids(df, f["user"], inter_path), ids(df, f["item"], inter_path), ts,
                         event, value)
    item_path = folder / f"{dataset}.item"
    items = _items(item_path, f["item"]) if item_path.is_file() else None
    user_path = folder / f"{dataset}.user"
    if user_path.is_file():
        udf, _ = atomic(user_path)
        need(udf, [f["user"]], user_path)
        idle = ~ids(udf, f["user"], user_path).isin(set(inter["user"]))
        if idle.any():
            log.info("%s: %d listed users have no interactions", user_path, int(idle.sum()))
    return finish(inter, items, domain or dataset, inter_path)


def _items(path: Path, item_field: str) -> pd.DataFrame:
    df, types = atomic(path)
    need(df, [item_field], path)
    items = pd.DataFrame({"item": ids(df, item_field, path)}, index=df.index)
    texts, vectors = [], []
    for name, typ in types.items():
        if name == item_field:
            continue
        s = df[name].str.strip()
        if typ.startswith("token") and any(h in name.lower() for h in _TEXT_HINTS):
            texts.append(s.str.split().str.join(" "))
        elif typ == "float_seq":
            vectors.append(name)
        else:
            if typ == "token_seq":
                s = s.str.split().str.join("|")
            elif typ == "float":
                s = s.str.replace(_INT_FLOAT, r"\1", regex=True)
            items[f"{name}_attr" if name in ("item", "domain", "text") else name] = s
    if vectors:
        log.info("%s: float_seq fields %s left out (vectors are not categorical attributes)",
                 path, vectors)
    items["text"] = texts[0].str.cat(texts[1:], sep=". ") if texts else ""
    return unique_items(items, path)

