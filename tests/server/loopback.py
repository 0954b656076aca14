"""A loopback Flower ``Grid`` for tests: each message goes straight to a ClientApp.

The ServerApp's driver, the transport and the ClientApp run unchanged; only the network is
missing. A fresh grid (with ``clients.app``'s node cache cleared) is what a restarted
federation looks like. ``fault_app`` is the production ClientApp's handlers behind a test
mod that makes chosen clients raise or reply NaN / wrongly shaped updates: fault injection
lives here, never in production code.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_module
from fedmeta.config import to_dict
import wire


class LoopbackGrid(Grid):
    def __init__(self, app, num_nodes: int, node_config: dict[int, dict] | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = app
        self.ctx = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                     node_config={"partition-id": i, "num-partitions": num_nodes,
                                                  **(node_config or {}).get(i, {})})
                    for i in range(num_nodes)}
        self.sent: list[str] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def get_node_ids(self):
        return list(self.ctx)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(m.metadata.message_type)
            try:
                out.append(self.app(m, self.ctx[m.metadata.dst_node_id]))
            except Exception as err:  # what every Flower runtime does with a raising ClientApp
                out.append(Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=m))
        return out


FAULTS: dict[str, str] = {}     # client id -> "raise" | "nan" | "shape"


def fault_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cid = client_module.node_for(context).client_id
    kind = FAULTS.get(cid, "")
    if kind == "raise":
        raise RuntimeError(f"injected failure in client {cid}")
    reply = call_next(msg, context)
    if kind in ("nan", "shape") and not reply.has_error():
        upd = wire.from_record(reply.content[wire.UPDATE])
        name = next(iter(upd))
        upd[name] = (torch.full_like(upd[name], float("nan")) if kind == "nan" else torch.zeros(3))
        reply.content[wire.UPDATE] = wire.to_record(upd)
    return reply


fault_app = ClientApp(mods=[fault_mod])
fault_app.query()(client_module.query)
fault_app.train()(client_module.train)
fault_app.evaluate()(client_module.evaluate)


def flower_run(cfg, out_dir: Path, app=None, stop_after: int | None = None, extra_nodes: int = 0):
    """Prepare silos + node files as the simulation engine does, then run the ServerApp."""
    from server.app import run_server
    from server.simulate import prepare

    silo_root, nodes_dir = prepare(cfg, Path(out_dir))
    os.environ[client_module.NODES_DIR_ENV] = str(nodes_dir)
    client_module._nodes.clear()
    n = len(list(nodes_dir.glob("node-*.json"))) + extra_nodes
    grid = LoopbackGrid(app or client_module.app, n)
    run_config = {"experiment": json.dumps(to_dict(cfg)), "output-dir": str(out_dir),
                  "federation": str(silo_root)}
    if stop_after:
        run_config["stop-after"] = stop_after
    return run_server(grid, run_config, echo=lambda line: None), grid
