"""The Flower ``ClientApp``: read the node's own config, translate messages, call the Node.

Which silo a SuperNode serves, where its data and state live and how private its updates
are all come from the node itself, never from a message:

* deployment: the SuperNode's node config names its node file,
  ``flower-supernode ... --node-config "fedmeta-node='/abs/node.json'"`` (``fedmeta-node
  init`` writes one and creates the node's privacy budget);
* simulation: the engine writes one node file per virtual SuperNode at start-up into the
  directory named by ``FEDMETA_NODES_DIR`` and the node reads ``node-<partition-id>.json``.

The node (:class:`fedmeta.runtime.node.Node`, with its silo, model and ledger) is built once
per process and kept for later messages. A message that carries anything beyond the global
arrays, the round, the run-level config and the expected client id, or whose run config
contradicts the node's own, is refused: the handler raises, and Flower turns that into an
error reply; nothing is trained.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmeta.runtime.node import Node, NodeConfig
from wire import (NODE_KEY, NODES_DIR_ENV, describe_reply, read_instruction, rows_reply,
                  update_reply)

log = logging.getLogger(__name__)

CACHE_SIZE = 8                      # nodes kept per process (a Ray actor plays several)

_nodes: "OrderedDict[str, Node]" = OrderedDict()

app = ClientApp()


def node_file(context: Context) -> Path:
    if NODE_KEY in context.node_config:
        return Path(str(context.node_config[NODE_KEY]))
    root = os.environ.get(NODES_DIR_ENV, "")
    if root and "partition-id" in context.node_config:
        return Path(root) / f"node-{int(context.node_config['partition-id'])}.json"
    raise ValueError(f"this SuperNode has no fedmeta node config: start it with --node-config "
                     f"\"{NODE_KEY}='/abs/path/node.json'\" (written by 'fedmeta-node init')")


def node_for(context: Context) -> Node:
    path = str(node_file(context).resolve())
    node = _nodes.get(path)
    if node is None:
        if not Path(path).is_file():
            raise ValueError(f"node config {path} not found (partition-id "
                             f"{context.node_config.get('partition-id')}): is the number of "
                             "SuperNodes the number of federation clients?")
        node = Node(NodeConfig.load(path))
        _nodes[path] = node
        while len(_nodes) > CACHE_SIZE:
            _nodes.popitem(last=False)
    _nodes.move_to_end(path)
    return node


def _instruction(msg: Message, node: Node):
    params, server_round, run, client_id = read_instruction(msg.content)
    if client_id != node.client_id:
        raise ValueError(f"the server sent client {client_id!r}'s work to the node serving "
                         f"{node.client_id!r}")
    return params, server_round, run


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node serves: public facts only (id, domain, new-client flag)."""
    return Message(describe_reply(node_for(context).describe()), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = node_for(context)
    params, server_round, run = _instruction(msg, node)
    update = node.train(params, server_round, run)
    return Message(update_reply(update, node.client_id), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = node_for(context)
    params, server_round, run = _instruction(msg, node)
    return Message(rows_reply(node.evaluate(params, server_round, run), node.client_id),
                   reply_to=msg)
