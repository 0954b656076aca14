"""What every reader does last: complete the catalogue, validate, and note what was cleaned.

The notes go to the load report of the source being read (see ``_options``), so the one
summary line per source can say how many rows were dropped and why without each reader
counting for itself.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.schema import InteractionData, validate

log = logging.getLogger("fedmeta.data.loaders")

# The report of the source being loaded right now; a fresh dict per public loader call.
REPORT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("load_report", default=None)


def note(**facts) -> None:
    """Record facts about the current load for its summary line (no-op outside a load)."""
    report = REPORT.get()
    if report is not None:
        report.update(facts)


def row_clock(n: int, path: Path, what: str = "") -> np.ndarray:
    """A clock from file row order, for files without timestamps; always a WARNING because the
    temporal splits downstream then rest on an assumption about how the file was written."""
    log.warning("%s has no timestamps: using file row order as the clock%s", path, what)
    note(clock="file row order")
    return np.arange(n, dtype=float)


def finish(inter: pd.DataFrame, items: pd.DataFrame | None, domain: str, source: Path
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
    data = validate(InteractionData(inter, items), source=str(source))
    note(source=str(source), duplicates=len(inter) - len(data.interactions),
         uncatalogued=len(absent))
    return data
