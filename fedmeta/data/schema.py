"""The one schema every data source produces.

Every loader (synthetic or real) returns an :class:`InteractionData`: a long frame of
interactions and a frame of item attributes. Everything downstream (partitioning, tasks,
featurisation) reads only these columns, so adding a source never touches the rest of the
pipeline.

Interactions columns
    ``user`` (str), ``item`` (str), ``timestamp`` (float, seconds or any monotone clock),
    ``event`` (str: view / cart / purchase / like / comment / share / follow / rating ...),
    ``value`` (float: rating, or 1.0 for implicit events), ``domain`` (str).
Items columns
    ``item`` (str, unique within a domain), ``domain`` (str), ``text`` (str, may be empty),
    plus any number of categorical attribute columns (str). Multi-valued attributes use
    ``|`` between values; hierarchical ones (category paths) use ``/``.

Item ids are namespaced by domain (``item`` is unique per ``(domain, item)``), because
catalogues of different domains are disjoint by assumption.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ["user", "item", "timestamp", "event", "value", "domain"]
ITEM_BASE_COLUMNS = ["item", "domain", "text"]


class DataError(ValueError):
    """Bad input data, located as precisely as we can (file, line, column)."""

    def __init__(self, reason: str, file: str | None = None, line: int | None = None,
                 column: str | None = None):
        self.reason, self.file, self.line, self.column = reason, file, line, column
        where = []
        if file is not None:
            where.append(str(file) + (f":{line}" if line is not None else ""))
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


@dataclass
class InteractionData:
    """Interactions plus item attributes for one or more domains."""

    interactions: pd.DataFrame
    items: pd.DataFrame

    @property
    def domains(self) -> list[str]:
        return sorted(self.interactions["domain"].unique().tolist())

    def domain(self, name: str) -> "InteractionData":
        inter = self.interactions[self.interactions["domain"] == name]
        if inter.empty:
            raise DataError(f"domain '{name}' has no interactions (known: {self.domains})")
        items = self.items[self.items["domain"] == name]
        return InteractionData(inter.reset_index(drop=True), items.reset_index(drop=True))

    @staticmethod
    def concat(parts: list["InteractionData"]) -> "InteractionData":
        inter = pd.concat([p.interactions for p in parts], ignore_index=True)
        items = pd.concat([p.items for p in parts], ignore_index=True)
        items = items.fillna({c: "" for c in items.columns if c not in ("item", "domain")})
        dup = items.duplicated(["domain", "item"])
        if dup.any():
            first = items[dup].iloc[0]
            raise DataError(f"item '{first['item']}' defined twice in domain '{first['domain']}'")
        return InteractionData(inter, items)

    @property
    def attribute_columns(self) -> list[str]:
        return [c for c in self.items.columns if c not in ITEM_BASE_COLUMNS]


def validate(data: InteractionData, source: str = "<data>") -> InteractionData:
    """Check the schema and clean what can be cleaned, logging every row it removes.

    Raises :class:`DataError` for anything that cannot be repaired (missing columns, empty
    domains, interactions with items that have no attributes row).
    """
    inter, items = data.interactions, data.items
    for col in INTERACTION_COLUMNS:
        if col not in inter.columns:
            raise DataError(f"missing interaction column (have {list(inter.columns)})", source,
                            column=col)
    for col in ITEM_BASE_COLUMNS:
        if col not in items.columns:
            raise DataError(f"missing item column (have {list(items.columns)})", source, column=col)
    if inter.empty:
        raise DataError("no interactions", source)
    inter = inter[INTERACTION_COLUMNS].copy()
    for col in ("user", "item", "event", "domain"):
        inter[col] = inter[col].astype(str)
    for col in ("timestamp", "value"):
        bad = pd.to_numeric(inter[col], errors="coerce").isna() & inter[col].notna()
        if bad.any() or inter[col].isna().any():
            row = int(np.flatnonzero(bad | inter[col].isna())[0])
            raise DataError(f"non-numeric or missing value {inter[col].iloc[row]!r} at row {row}",
                            source, column=col)
        inter[col] = inter[col].astype(float)
    n = len(inter)
    inter = inter.drop_duplicates()
    if len(inter) < n:
        log.warning("%s: dropped %d exact duplicate interaction rows", source, n - len(inter))
    items = items.copy()
    items["item"] = items["item"].astype(str)
    items["domain"] = items["domain"].astype(str)
    items["text"] = items["text"].fillna("").astype(str)
    dup = items.duplicated(["domain", "item"])
    if dup.any():
        first = items[dup].iloc[0]
        raise DataError(f"item '{first['item']}' listed twice in domain '{first['domain']}'",
                        source, column="item")
    known = pd.MultiIndex.from_frame(items[["domain", "item"]])
    used = pd.MultiIndex.from_frame(inter[["domain", "item"]])
    missing = ~used.isin(known)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(f"item '{inter['item'].iloc[row]}' of domain '{inter['domain'].iloc[row]}' "
                        f"has no row in the item table ({int(missing.sum())} interactions affected)",
                        source, column="item")
    unused = ~known.isin(used)
    if unused.any():
        log.info("%s: %d catalogue items have no interactions (kept as ranking candidates)",
                 source, int(unused.sum()))
    return InteractionData(inter.reset_index(drop=True), items.reset_index(drop=True))


def filter_min_interactions(data: InteractionData, min_user: int, source: str = "<data>"
                            ) -> InteractionData:
    """Drop users with fewer than ``min_user`` interactions per domain, saying how many."""
    inter = data.interactions
    counts = inter.groupby(["domain", "user"])["item"].transform("size")
    keep = counts >= min_user
    if (~keep).any():
        dropped_users = inter.loc[~keep, ["domain", "user"]].drop_duplicates()
        log.warning("%s: dropped %d users (%d interactions) with fewer than %d interactions",
                    source, len(dropped_users), int((~keep).sum()), min_user)
    inter = inter[keep].reset_index(drop=True)
    for dom in data.domains:
        if not (inter["domain"] == dom).any():
            raise DataError(f"domain '{dom}' is empty after filtering users with fewer than "
                            f"{min_user} interactions", source)
    return InteractionData(inter, data.items)
