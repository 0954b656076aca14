"""Readers for public recommendation data sets and for files a user brings, each producing
the shared schema (:mod:`fedmeta.data.schema`).

One module per format family; what they share lives in the private modules: ``_parse``
(string tables indexed by file line, so every bad value is reported as ``file:line, column``),
``_finish`` (catalogue completion and validation) and ``_options`` (the options every loader
accepts: ``on_equal_timestamps``, ``min_interactions``, ``max_users``/``user_fraction`` with
``subsample_seed``, plus the one INFO summary line per source).
"""

from __future__ import annotations

from fedmeta.data.loaders._options import SHARED_OPTIONS, OptionError
from fedmeta.data.loaders.generic import load_csv
from fedmeta.data.loaders.instacart import load_instacart
from fedmeta.data.loaders.movielens import load_movielens
from fedmeta.data.loaders.orange import load_epinions, load_filmtrust, load_orange_tab
from fedmeta.data.loaders.recbole import load_recbole
from fedmeta.data.schema import DataError, InteractionData

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


__all__ = ["LOADERS", "SHARED_OPTIONS", "DataError", "OptionError", "load_csv", "load_epinions",
           "load_filmtrust", "load_instacart", "load_movielens", "load_orange_tab",
           "load_recbole", "load_source"]
