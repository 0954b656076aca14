"""The wire format between the fedmeta ServerApp and ClientApp: every key, in one module.

Both Flower apps (``clients/`` and ``server/``) import this package and neither imports the
other. It also names the two places a node finds its own config: the SuperNode's
``node_config[NODE_KEY]`` (deployment) or the node file a launcher wrote into the directory
``$NODES_DIR_ENV`` (simulation).

Server -> node (train / evaluate): ``arrays`` (the global meta-parameters, Flower's own
ArrayRecord <-> torch state-dict conversion) and ``config`` with exactly three keys: the
round, the run-level config as JSON (:func:`fedmeta.config.run_config`) and the client the
server believes the node serves. Nothing else is accepted: a message with any other record
or key (a privacy setting, an accountant state, a data path, Hydra overrides) is refused
with an error reply before the node does anything, so a server cannot smuggle in what the
node's own config decides.

Node -> server: ``update`` (``global - local`` as an ArrayRecord), ``metrics`` (the weight
under Flower's ``num-examples`` key plus the node's reportable metrics) and ``meta`` (the
client id). Evaluation replies carry metric rows column-wise (records hold scalars and
lists, not lists of dicts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmeta.algorithms.base import ClientUpdate

ARRAYS, CONFIG, METRICS, META, UPDATE = "arrays", "config", "metrics", "meta", "update"
ROUND, RUN, CLIENT = "server-round", "fedmeta.run", "fedmeta.client-id"
WEIGHT = "num-examples"
ROWS_TEXT, ROWS_VALUES = "rows-text", "rows-values"
ROW_TEXT = ("population", "stage", "domain", "client", "metric")
ALLOWED_CONFIG = frozenset({ROUND, RUN, CLIENT})
NODE_KEY = "fedmeta-node"             # node_config key: path of the node's JSON file
NODES_DIR_ENV = "FEDMETA_NODES_DIR"   # simulation: where the engine wrote the node files


class WireError(ValueError):
    """A message is missing a part, or carries one it must not."""


# ---- arrays ---------------------------------------------------------------------------------
def to_record(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def from_record(record: ArrayRecord, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
    out = dict(record.to_torch_state_dict())
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def record_nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


# ---- server -> node ---------------------------------------------------------------------------
def instruction(params: Mapping[str, torch.Tensor], server_round: int, run: dict,
                client_id: str) -> RecordDict:
    return RecordDict({ARRAYS: to_record(params),
                       CONFIG: ConfigRecord({ROUND: int(server_round), RUN: json.dumps(run),
                                             CLIENT: client_id})})


def read_instruction(content: RecordDict) -> tuple[dict[str, torch.Tensor], int, dict, str]:
    """(params, round, run config, client id) -- or :class:`WireError` for anything else."""
    extra = sorted(set(content.keys()) - {ARRAYS, CONFIG})
    if extra:
        raise WireError(f"refused: unexpected record(s) {extra}; a server sends only "
                        f"{[ARRAYS, CONFIG]}")
    config = _single(content, CONFIG, ConfigRecord)
    unknown = sorted(set(config.keys()) - ALLOWED_CONFIG)
    if unknown:
        raise WireError(f"refused: unexpected config key(s) {unknown}; a server sends only "
                        f"{sorted(ALLOWED_CONFIG)} (privacy, data and state are the node's own)")
    missing = sorted(ALLOWED_CONFIG - set(config.keys()))
    if missing:
        raise WireError(f"refused: config lacks {missing}")
    try:
        run = json.loads(str(config[RUN]))
    except json.JSONDecodeError as err:
        raise WireError(f"refused: {RUN} is not valid JSON ({err})") from None
    rnd = config[ROUND]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise WireError(f"refused: {ROUND} must be an integer >= 1, got {rnd!r}")
    return from_record(_single(content, ARRAYS, ArrayRecord)), rnd, run, str(config[CLIENT])


# ---- node -> server ----------------------------------------------------------------------------
def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise WireError(f"metric {name!r}: {value!r} is not a number")
    return float(value)


def update_reply(update: ClientUpdate, client_id: str) -> RecordDict:
    metrics = {WEIGHT: int(update.num_tasks),
               **{k: _number(k, v) for k, v in update.metrics.items()}}
    return RecordDict({UPDATE: to_record(update.delta), METRICS: MetricRecord(metrics),
                       META: ConfigRecord({"client-id": client_id})})


def _single(content: RecordDict, key: str, kind: type):
    if key not in content:
        raise WireError(f"message has no {key!r} record (has {sorted(content.keys())})")
    rec = content[key]
    if not isinstance(rec, kind):
        raise WireError(f"record {key!r} is a {type(rec).__name__}, not {kind.__name__}")
    return rec


def reply_client(content: RecordDict) -> str:
    return str(_single(content, META, ConfigRecord)["client-id"])


def read_update(content: RecordDict) -> ClientUpdate:
    """Shapes and names are checked by :func:`fedmeta.runtime.server.check_update`, for
    every runtime alike."""
    delta = from_record(_single(content, UPDATE, ArrayRecord))
    metrics = dict(_single(content, METRICS, MetricRecord))
    if WEIGHT not in metrics:
        raise WireError(f"reply metrics lack {WEIGHT!r}")
    weight = metrics.pop(WEIGHT)
    return ClientUpdate(delta, int(weight), {k: float(v) for k, v in metrics.items()
                                             if not isinstance(v, list)})


def rows_reply(rows: list[dict], client_id: str) -> RecordDict:
    return RecordDict({
        ROWS_TEXT: ConfigRecord({k: [str(r[k]) for r in rows] for k in ROW_TEXT}),
        ROWS_VALUES: MetricRecord({"value": [float(r["value"]) for r in rows],
                                   "round": [int(r["round"]) for r in rows]}),
        META: ConfigRecord({"client-id": client_id})})


def read_rows(content: RecordDict) -> list[dict]:
    text = _single(content, ROWS_TEXT, ConfigRecord)
    values = _single(content, ROWS_VALUES, MetricRecord)
    n = len(values["value"])
    columns = {k: list(text[k]) for k in ROW_TEXT}
    if any(len(c) != n for c in columns.values()) or len(values["round"]) != n:
        raise WireError("metric row columns have different lengths")
    return [{"round": int(values["round"][i]), **{k: columns[k][i] for k in ROW_TEXT},
             "value": float(values["value"][i])} for i in range(n)]


def describe_reply(info: dict) -> RecordDict:
    return RecordDict({META: ConfigRecord(dict(info))})
