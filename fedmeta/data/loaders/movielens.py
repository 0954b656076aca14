"""GroupLens MovieLens in its two native layouts (``::`` .dat files and the 100K ``u.*``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.loaders._finish import finish
from fedmeta.data.loaders._options import source_loader
from fedmeta.data.loaders._parse import (fail, ids, interactions, numbers, read_text, table,
                                         times, unique_items)
from fedmeta.data.schema import DataError, InteractionData

log = logging.getLogger("fedmeta.data.loaders")

_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@source_loader("movielens")
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
    text = read_text(ratings)
    dat = "::" in text[:text.find("\n") if "\n" in text else len(text)]
    df = table(ratings, "::" if dat else "\t", names=["user", "item", "rating", "timestamp"],
               text=text)
    inter = interactions(ids(df, "user", ratings), ids(df, "item", ratings),
                         times(df, "timestamp", ratings), "rating",
                         numbers(df, "rating", ratings, "rating"))
    catalogue = ratings.parent / ("movies.dat" if dat else "u.item")
    if not catalogue.is_file():
        log.warning("%s: no %s beside the ratings; items get empty text and no genre",
                    ratings, catalogue.name)
        items = None
    elif dat:
        mv = table(catalogue, "::", names=["item", "title", "genre"],
                   encodings=("utf-8-sig", "latin-1"))
        genre = mv["genre"].str.strip().replace("(no genres listed)", "")
        items = pd.DataFrame({"item": ids(mv, "item", catalogue),
                              "text": mv["title"].str.strip(), "genre": genre})
        items = unique_items(items, catalogue)
    else:
        items = _u_item(catalogue)
    return finish(inter, items, domain, ratings)


def _u_item(path: Path) -> pd.DataFrame:
    """MovieLens-100K ``u.item``: id|title|release|video release|url|one 0/1 flag per genre."""
    df = table(path, "|", encodings=("utf-8-sig", "latin-1"))
    if df.shape[1] < 6:
        raise DataError(f"expected id|title|release date|video date|url|genre flags, found "
                        f"{df.shape[1]} fields", str(path), int(df.index[0]))
    n_flags = df.shape[1] - 5
    genres = _ML100K_GENRES
    genre_file = path.parent / "u.genre"
    if genre_file.is_file():
        g = table(genre_file, "|", names=["genre", "index"])
        genres = g["genre"].iloc[np.argsort(numbers(g, "index", genre_file).to_numpy())].tolist()
    if len(genres) != n_flags:
        raise DataError(f"{n_flags} genre flag fields but {len(genres)} genre names", str(path),
                        int(df.index[0]))
    flags = df.iloc[:, 5:].apply(lambda s: s.str.strip())
    flags.columns = genres
    for name in genres:
        fail(flags, ~flags[name].isin(["0", "1"]), name, path, "genre flag must be 0 or 1, got")
    genre = (flags == "1").dot(pd.Index(genres) + "|").str.rstrip("|")
    df.columns = ["item", "title", *df.columns[2:]]
    items = pd.DataFrame({"item": ids(df, "item", path), "text": df["title"].str.strip(),
                          "genre": genre})
    return unique_items(items, path)
