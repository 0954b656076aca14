"""The Flower ``ClientApp``: decode a message, call fedmeta's :class:`ClientRunner`, encode.

Which fedmeta client a node is comes from its ``node_config["partition-id"]``: the index
into the federation's client list (training clients and held-out new clients alike), so
e-commerce and social nodes train on their own silos.

The experiment config travels *in every message* (``fedmeta.overrides``: the Hydra
overrides as a JSON list), not in ``run_config`` or the environment, because that is the
one channel every runtime carries (``run_simulation`` has no run config, real SuperNodes
only see what the SuperLink forwards). The federation built from it is cached per process
and keyed by the overrides: it is derived from config only. Anything a client must carry
from round to round (its DP accountant) lives in ``Context.state``; it is also returned in
every reply so the server can checkpoint it and hand it back to a node whose state was lost
(a restarted simulation or SuperNode); a node that kept its own state uses its own.

The private item table (``model.private_item_embeddings``) is the exception: it never leaves
the node. It lives in ``Context.state`` as an ``ArrayRecord`` stamped with its round and, when
the node has a state directory (``node_config["state-dir"]`` or ``runtime.client_state_dir``),
also on the node's own disk, so a restarted node resumes it exactly.

Test hook (kept out of fedmeta): ``node_config["fault"]`` or ``FEDMETA_INJECT_FAULTS``
(``"client-id=raise,client-id=nan"``) makes a client's training raise, reply NaN, or reply
a wrongly shaped tensor (``shape``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import Federation, build_federation
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.private_store import PrivateStore
from server.codec import ARRAYS, CONFIG, META, decode_state, encode_state, from_array_record, \
    rows_to_records, to_array_record, update_to_content

log = logging.getLogger(__name__)

OVERRIDES = "fedmeta.overrides"     # JSON list of Hydra overrides
EXPECTED = "fedmeta.client-id"      # the client the server believes this node is
STATE, STATE_ROUND = "fedmeta.state", "fedmeta.state-round"
CLIPPING = "fedmeta.clipping"       # "", "fixed" or "adaptive": which clipping mod applies
STATE_KEY = "fedmeta"               # Context.state record
PRIVATE_KEY = "fedmeta.private"     # Context.state: the private item table (never sent)
PRIVATE_ROUND = "fedmeta.private-round"
RUN_KEY = "fedmeta.run-key"         # names the run's sub-directory of a node's state dir
STATE_DIR_HINT = "fedmeta.state-dir"  # simulation: where nodes may keep private tables
FAULT_ENV = "FEDMETA_INJECT_FAULTS"
CACHE_SIZE = 2                      # federations kept per process (sweeps change config)

_federations: "OrderedDict[tuple[str, ...], Federation]" = OrderedDict()

app = ClientApp()


def federation_for(overrides: tuple[str, ...]) -> Federation:
    fed = _federations.get(overrides)
    if fed is None:
        fed = build_federation(compose(list(overrides)))
        _federations[overrides] = fed
        while len(_federations) > CACHE_SIZE:
            _federations.popitem(last=False)
    _federations.move_to_end(overrides)
    return fed


def _overrides(config: ConfigRecord) -> tuple[str, ...]:
    raw = json.loads(str(config.get(OVERRIDES, "[]")))
    if not isinstance(raw, list):
        raise ValueError(f"{OVERRIDES} must be a JSON list of Hydra overrides, got {raw!r}")
    return tuple(str(o) for o in raw)


def node_client(context: Context, fed: Federation) -> str:
    """The fedmeta client id this node serves, from its partition id."""
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id' (which federation client this node is)")
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < len(fed.clients):
        raise ValueError(f"node_config partition-id={pid} is out of range: the federation has "
                         f"{len(fed.clients)} clients (0..{len(fed.clients) - 1})")
    return fed.clients[pid].client_id


def _setup(msg: Message, context: Context) -> tuple[Federation, str, ConfigRecord]:
    config = msg.content[CONFIG]
    fed = federation_for(_overrides(config))
    cid = node_client(context, fed)
    expected = str(config.get(EXPECTED, cid))
    if expected != cid:
        raise ValueError(f"the server sent client {expected!r}'s work to the node serving {cid!r}")
    return fed, cid, config


def _fault(context: Context, cid: str) -> str:
    if "fault" in context.node_config:
        return str(context.node_config["fault"])
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, kind = item.partition("=")
        if name.strip() == cid:
            return kind.strip()
    return ""


def _stored_state(context: Context, config: ConfigRecord) -> dict:
    """This node's own state, else the server's copy (the node lost its state in a restart).

    A node's own state is never older than what it told the server; the server's copy can
    only be *more* charged (rounds it could not confirm), which a node that kept its state
    knows better than the server."""
    mine = context.state.config_records.get(STATE_KEY)
    if mine is not None:
        return decode_state(str(mine["state"]))
    return decode_state(str(config.get(STATE, "")))


def _store(context: Context, fed: Federation, cid: str, config: ConfigRecord
           ) -> PrivateStore | None:
    """The node's disk store: its own ``state-dir``, else ``runtime.client_state_dir``, else
    (simulation: nodes share the server's machine) the directory the server suggests; one
    sub-directory per run, so a later experiment never picks up an earlier one's tables."""
    root = str(context.node_config.get("state-dir", "") or fed.cfg.runtime.client_state_dir
               or config.get(STATE_DIR_HINT, ""))
    if not root:
        return None
    run = str(config.get(RUN_KEY, "")) or "run"
    return PrivateStore(Path(root) / run, cid, keep=fed.cfg.runtime.checkpoint_every + 1)


def _load_private(context: Context, fed: Federation, cid: str, config: ConfigRecord,
                  before_round: int, trained_before: bool = False
                  ) -> dict[str, torch.Tensor] | None:
    """The newest private table from a round before ``before_round``: memory, else disk.

    ``trained_before``: the server saw this client train, so a missing table was lost."""
    rec = context.state.array_records.get(PRIVATE_KEY)
    stamp = context.state.config_records.get(PRIVATE_ROUND)
    if rec is not None and stamp is not None and int(stamp["round"]) < before_round:
        return from_array_record(rec, fed.device)
    store = _store(context, fed, cid, config)
    found = store.load(before_round) if store is not None else None
    if found is not None:
        return {k: v.to(fed.device) for k, v in found[1].items()}
    if fed.cfg.model.private_item_embeddings and trained_before:
        log.warning("client %s: no private item table from before round %d (node restarted "
                    "without a state directory); it starts again from zero", cid, before_round)
    return None


def _keep_private(context: Context, fed: Federation, cid: str, config: ConfigRecord,
                  server_round: int, private: dict[str, torch.Tensor]) -> None:
    if not private:
        return
    context.state[PRIVATE_KEY] = to_array_record(private)
    context.state[PRIVATE_ROUND] = ConfigRecord({"round": server_round})
    store = _store(context, fed, cid, config)
    if store is not None:
        store.save(server_round, private)


def central_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping mods, applied only when the server asks for them."""
    mode = msg.content[CONFIG].get(CLIPPING, "") if CONFIG in msg.content else ""
    if mode == "fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is: the server's map from node ids to fedmeta clients."""
    fed = federation_for(_overrides(msg.content[CONFIG]))
    cid = node_client(context, fed)
    tasks = fed.client(cid)
    info = ConfigRecord({"client-id": cid, "domain": tasks.catalog.domain,
                         "new-client": bool(tasks.partition.new_client),
                         "num-clients": len(fed.clients),
                         "partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config.get("num-partitions", -1))})
    return Message(RecordDict({META: info}), reply_to=msg)


@app.train(mods=[central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    fed, cid, config = _setup(msg, context)
    fault = _fault(context, cid)
    if fault == "raise":
        raise RuntimeError(f"injected failure in client {cid}")
    server_round = int(config["server-round"])
    params = from_array_record(msg.content[ARRAYS], fed.device)
    update, state = ClientRunner(fed, cid).train(params, server_round, _stored_state(context, config),
                                                 _load_private(context, fed, cid, config, server_round,
                                                               int(config.get(STATE_ROUND, -1)) > 0))
    context.state[STATE_KEY] = ConfigRecord({"state": encode_state(state), "round": server_round})
    _keep_private(context, fed, cid, config, server_round, update.private)
    if fault == "nan":
        update.delta = {k: torch.full_like(v, float("nan")) for k, v in update.delta.items()}
    elif fault == "shape":
        name = next(iter(update.delta))
        update.delta[name] = torch.zeros(3)
    reply_params = params if fault != "shape" else {**params, name: torch.zeros(3)}
    return Message(update_to_content(update, reply_params, cid, state), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    fed, cid, config = _setup(msg, context)
    params = from_array_record(msg.content[ARRAYS], fed.device)
    server_round = int(config["server-round"])
    rows = ClientRunner(fed, cid).evaluate(params, server_round,
                                           _load_private(context, fed, cid, config, server_round + 1))
    content = rows_to_records(rows)
    content[META] = ConfigRecord({"client-id": cid})
    return Message(content, reply_to=msg)
