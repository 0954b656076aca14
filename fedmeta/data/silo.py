"""Per-domain frames -> silo partitions: what one node holds, written once, read by that node.

A federation's sources are split into silos exactly once (``fedmeta-partition``, or the
simulation engine at start-up). Each silo becomes a directory with only its own users'
interactions, its domain's item catalogue (item attributes are public product or post
metadata, shared by every silo of the domain) and a ``silo.json`` naming the client and its
split into training and cold-start users. A node is given that directory and nothing else,
so it can neither read another silo's users nor grow with the size of the federation.

A ``federation.json`` beside the silos lists the clients (id, domain, new-client flag) and
the catalogue sizes: public facts the server needs to address nodes and to size shared
item tables, and nothing about any user.

Frames are stored as Parquet, which round-trips every value exactly, so a node reading its
silo from disk trains on bit-for-bit the data the in-process runtime hands it in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from fedmeta.atomic import write_json
from fedmeta.data.partition import ClientPartition
from fedmeta.data.schema import DataError, InteractionData

log = logging.getLogger(__name__)

SILO_FORMAT = 1
MANIFEST = "federation.json"


@dataclass
class Silo:
    """One client's own data: its partition, its users' interactions, its domain's items."""

    partition: ClientPartition
    data: InteractionData

    @property
    def client_id(self) -> str:
        return self.partition.client_id


@dataclass(frozen=True)
class ClientEntry:
    """What the federation manifest says of one client (public: no user appears here)."""

    client_id: str
    domain: str
    new_client: bool
    order: int


def make_silos(data: InteractionData, parts: list[ClientPartition]) -> list[Silo]:
    """Cut the federation's frame into one :class:`Silo` per partition."""
    by_domain = {d: data.domain(d) for d in data.domains}
    silos = []
    for part in parts:
        dom = by_domain[part.domain]
        mine = dom.interactions[dom.interactions["user"].isin(set(part.users))]
        silos.append(Silo(part, InteractionData(mine.reset_index(drop=True),
                                                dom.items.reset_index(drop=True))))
    return silos


def catalogue_sizes(silos: list[Silo]) -> dict[str, int]:
    """``{domain: catalogue items}`` of a federation: what its manifest publishes."""
    sizes: dict[str, int] = {}
    for silo in silos:
        n = int(len(silo.data.items))
        if sizes.setdefault(silo.partition.domain, n) != n:
            raise DataError(f"silos of domain {silo.partition.domain!r} disagree on the catalogue "
                            f"size ({sizes[silo.partition.domain]} vs {n} at {silo.client_id})")
    return dict(sorted(sizes.items()))


def silo_dir(root: str | Path, client_id: str) -> Path:
    return Path(root) / client_id.replace("/", "_")


def write_silos(silos: list[Silo], root: str | Path) -> Path:
    """One directory per silo plus the manifest; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    catalogues = catalogue_sizes(silos)
    clients = []
    for order, silo in enumerate(silos):
        d = silo_dir(root, silo.client_id)
        d.mkdir(parents=True, exist_ok=True)
        silo.data.interactions.to_parquet(d / "interactions.parquet", index=False)
        silo.data.items.to_parquet(d / "items.parquet", index=False)
        part = asdict(silo.partition)
        write_json(d / "silo.json", {"format": SILO_FORMAT, **part})
        clients.append(asdict(ClientEntry(silo.client_id, silo.partition.domain,
                                          bool(silo.partition.new_client), order)))
    write_json(root / MANIFEST, {"format": SILO_FORMAT, "clients": clients,
                                   "catalogues": catalogues})
    log.info("wrote %d silos to %s", len(silos), root)
    return root


def read_silo(directory: str | Path) -> Silo:
    """A node's own silo, checked: a missing or foreign file is a :class:`DataError`."""
    d = Path(directory)
    meta_path = d / "silo.json"
    if not meta_path.is_file():
        raise DataError("not a silo directory (no silo.json); write silos with fedmeta-partition",
                        str(d))
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg})", str(meta_path), err.lineno) from None
    if meta.get("format") != SILO_FORMAT:
        raise DataError(f"silo format {meta.get('format')!r} is not {SILO_FORMAT}", str(meta_path))
    try:
        part = ClientPartition(str(meta["client_id"]), str(meta["domain"]),
                               tuple(meta["train_users"]), tuple(meta["cold_users"]),
                               bool(meta["new_client"]))
    except KeyError as err:
        raise DataError(f"missing key {err.args[0]!r}", str(meta_path)) from None
    for name in ("interactions.parquet", "items.parquet"):
        if not (d / name).is_file():
            raise DataError("file not found", str(d / name))
    inter = pd.read_parquet(d / "interactions.parquet")
    items = pd.read_parquet(d / "items.parquet")
    foreign = set(inter["user"].unique()) - set(part.users)
    if foreign:
        raise DataError(f"{len(foreign)} user(s) not in this silo's partition, e.g. "
                        f"{sorted(foreign)[:3]}", str(d / "interactions.parquet"))
    if set(inter["domain"].unique()) - {part.domain}:
        raise DataError(f"interactions of another domain than {part.domain!r}",
                        str(d / "interactions.parquet"))
    return Silo(part, InteractionData(inter, items))


def read_manifest(root: str | Path) -> tuple[list[ClientEntry], dict[str, int]]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError("federation manifest not found; write silos with fedmeta-partition",
                        str(path))
    meta = json.loads(path.read_text())
    return ([ClientEntry(**c) for c in meta["clients"]], dict(meta["catalogues"]))
