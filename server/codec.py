"""Translation between fedmeta's plain objects and Flower records.

Both apps go through these functions and nothing else, so the wire format is defined in one
place:

* meta-parameters <-> ``ArrayRecord`` (names, order, dtype and shape preserved exactly);
* a training reply: the client's *local model* ``global - delta`` in ``"arrays"`` (what
  Flower's clipping mods and DP wrappers expect: they clip ``reply - global``), the task
  count as ``"num-examples"`` plus the client's training metrics in ``"metrics"``, and the
  client id and its persistent state (JSON) in ``"meta"``;
* evaluation metric rows <-> a column-wise ``ConfigRecord`` (strings) + ``MetricRecord``
  (values), because Flower records hold scalars and lists, not lists of dicts.

Client state is small public bookkeeping (DP accountant histories), so JSON in a
``ConfigRecord`` string is enough and survives every transport.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmeta.algorithms.base import ClientUpdate

ARRAYS, CONFIG, METRICS, META = "arrays", "config", "metrics", "meta"
WEIGHT = "num-examples"          # FedAvg's default weighting key carries the task count
ROW_TEXT = ("population", "stage", "domain", "client", "metric")


class CodecError(ValueError):
    """A record is missing a part or carries something of the wrong type."""


def to_array_record(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in params.items()})


def from_array_record(record: ArrayRecord, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def array_record_nbytes(record: ArrayRecord) -> int:
    """Serialised payload size, i.e. what actually travels (numpy buffers plus headers)."""
    return sum(len(a.data) for a in record.values())


def encode_state(state: Mapping | None) -> str:
    return json.dumps(state or {}, sort_keys=True)


def decode_state(text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise CodecError(f"client state is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CodecError(f"client state must be a JSON object, got {type(value).__name__}")
    return value


def _metric_value(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise CodecError(f"metric {name!r}: {value!r} is not a number")
    return float(value)


def update_to_content(update: ClientUpdate, global_params: Mapping[str, torch.Tensor],
                      client_id: str, state: Mapping | None) -> RecordDict:
    local = {k: global_params[k].detach().cpu() - update.delta[k].detach().cpu()
             for k in global_params}
    metrics = {WEIGHT: int(update.num_tasks)}
    metrics.update({k: _metric_value(k, v) for k, v in update.metrics.items()})
    return RecordDict({ARRAYS: to_array_record(local), METRICS: MetricRecord(metrics),
                       META: ConfigRecord({"client-id": client_id, "state": encode_state(state)})})


def _single(content: RecordDict, key: str, kind: type):
    if key not in content:
        raise CodecError(f"reply has no {key!r} record (has {sorted(content.keys())})")
    rec = content[key]
    if not isinstance(rec, kind):
        raise CodecError(f"reply record {key!r} is a {type(rec).__name__}, not {kind.__name__}")
    return rec


def content_client_id(content: RecordDict) -> str:
    return str(_single(content, META, ConfigRecord)["client-id"])


def content_to_update(content: RecordDict, global_params: Mapping[str, torch.Tensor]
                      ) -> tuple[str, ClientUpdate, dict]:
    """(client id, update with ``delta = global - local``, client state) from a training reply.

    Shapes and names are not checked here: :func:`fedmeta.runtime.server.check_update` does
    that for every runtime, so a malformed reply is dropped and counted the same way.
    """
    meta = _single(content, META, ConfigRecord)
    local = from_array_record(_single(content, ARRAYS, ArrayRecord))
    metrics = dict(_single(content, METRICS, MetricRecord))
    if WEIGHT not in metrics:
        raise CodecError(f"reply metrics lack {WEIGHT!r}")
    num_tasks = int(metrics.pop(WEIGHT))
    delta = {}
    for k, v in local.items():
        ref = global_params.get(k)
        same = ref is not None and tuple(ref.shape) == tuple(v.shape)
        delta[k] = ref.detach().cpu() - v.to(ref.dtype) if same else v   # mis-shaped: for check_update
    metrics = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
    return (str(meta["client-id"]), ClientUpdate(delta, num_tasks, metrics),
            decode_state(str(meta.get("state", ""))))


def rows_to_records(rows: list[dict]) -> RecordDict:
    text = ConfigRecord({k: [str(r[k]) for r in rows] for k in ROW_TEXT})
    values = MetricRecord({"value": [float(r["value"]) for r in rows],
                           "round": [int(r["round"]) for r in rows]})
    return RecordDict({"rows-text": text, "rows-values": values})


def records_to_rows(content: RecordDict) -> list[dict]:
    text = _single(content, "rows-text", ConfigRecord)
    values = _single(content, "rows-values", MetricRecord)
    n = len(values["value"])
    columns = {k: list(text[k]) for k in ROW_TEXT}
    if any(len(c) != n for c in columns.values()) or len(values["round"]) != n:
        raise CodecError("metric row columns have different lengths")
    return [{"round": int(values["round"][i]), **{k: columns[k][i] for k in ROW_TEXT},
             "value": float(values["value"][i])} for i in range(n)]

