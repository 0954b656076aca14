"""The round driver's transport over Flower's ``Grid``: nodes are SuperNodes, calls are messages.

The server learns which node serves which client by asking every node (a ``query``
message; the reply names the client, its domain and whether it is a new client) and
checks the answers against the federation manifest (``federation.json`` beside the silos:
client ids and domains, no user data). Nodes that appear later (a restarted SuperNode gets
a new node id) are asked at the start of every round. A SuperNode count that does not
match the federation fails the run with a message saying how many are needed.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmeta.algorithms.base import ClientUpdate
from fedmeta.data.silo import ClientEntry
from wire import (META, WireError, instruction, read_rows, read_update, record_nbytes,
                         reply_client)

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class FederationMismatch(RuntimeError):
    """The SuperNodes do not serve the federation's clients one to one."""


class FlowerTransport:
    name = "flower"

    def __init__(self, grid: Grid, expected: list[ClientEntry], timeout: float):
        self.grid, self.timeout = grid, timeout
        self.expected = {c.client_id: c for c in expected}
        self.node_of: dict[str, int] = {}
        self.bytes_received = 0

    # ---- who is who ------------------------------------------------------------------------
    def _ask(self, nodes: list[int], strict: bool) -> None:
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise FederationMismatch(f"node {node} could not start: {reply.error.reason}")
                info = reply.content[META]
                cid = str(info["client-id"])
                entry = self.expected.get(cid)
                if entry is None:
                    raise FederationMismatch(f"node {node} serves {cid!r}, which is not a client of "
                                             f"this federation ({sorted(self.expected)})")
                if str(info["domain"]) != entry.domain or bool(info["new-client"]) != entry.new_client:
                    raise FederationMismatch(f"node {node} describes {cid!r} differently from the "
                                             "federation manifest (domain / new-client)")
                old = self.node_of.get(cid)
                if old is not None and old != node and strict:
                    raise FederationMismatch(f"nodes {old} and {node} both serve {cid!r}")
                self.node_of[cid] = node
            except FederationMismatch as err:
                if strict:
                    raise
                log.warning("ignoring node %s: %s", node, err)

    def clients(self) -> list[ClientEntry]:
        deadline = time.time() + self.timeout
        need = len(self.expected)
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) > need:
                raise FederationMismatch(f"{len(nodes)} SuperNodes are connected but the federation "
                                         f"has {need} clients: start exactly one SuperNode per "
                                         f"client (e.g. num-supernodes={need})")
            known = set(self.node_of.values())
            new = [n for n in nodes if n not in known]
            if new:
                self._ask(new, strict=True)
            if len(self.node_of) == need:
                return sorted(self.expected.values(), key=lambda c: c.order)
            if time.time() > deadline:
                missing = sorted(set(self.expected) - set(self.node_of))
                raise FederationMismatch(f"only {len(self.node_of)} of {need} federation clients "
                                         f"have a SuperNode after {self.timeout:.0f}s (missing "
                                         f"{missing[:5]}); start one SuperNode per client")
            time.sleep(POLL_SECONDS)

    def _refresh(self) -> None:
        known = set(self.node_of.values())
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if new:
            self._ask(new, strict=False)

    # ---- rounds ----------------------------------------------------------------------------
    def _send(self, kind: str, server_round: int, params, run, client_ids):
        self._refresh()
        msgs, sent = [], {}
        for cid in client_ids:
            m = Message(instruction(params, server_round, run, cid),
                        dst_node_id=self.node_of[cid], message_type=kind)
            msgs.append(m)
            sent[self.node_of[cid]] = cid
        out = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            cid = sent.get(reply.metadata.src_node_id)
            if cid is None:
                log.warning("ignoring a reply from node %s, which was not asked",
                            reply.metadata.src_node_id)
                continue
            if reply.has_error():
                out[cid] = RuntimeError(f"error reply: {reply.error.reason}")
                continue
            try:
                if reply_client(reply.content) != cid:
                    raise WireError(f"the node of client {cid!r} replied as another client")
                out[cid] = reply.content
            except (WireError, KeyError, TypeError, ValueError) as err:
                out[cid] = err
        return out

    def train(self, server_round, params, run, client_ids) -> dict[str, ClientUpdate | Exception]:
        out = {}
        for cid, content in self._send(MessageType.TRAIN, server_round, params, run,
                                       client_ids).items():
            if isinstance(content, Exception):
                out[cid] = content
                continue
            try:
                self.bytes_received += sum(record_nbytes(r) for r in content.array_records.values())
                out[cid] = read_update(content)
            except (WireError, KeyError, TypeError, ValueError) as err:
                out[cid] = err
        return out

    def evaluate(self, server_round, params, run, client_ids):
        out = {}
        for cid, content in self._send(MessageType.EVALUATE, server_round, params, run,
                                       client_ids).items():
            if isinstance(content, Exception):
                out[cid] = content
                continue
            try:
                out[cid] = read_rows(content)
            except (WireError, KeyError, TypeError, ValueError) as err:
                out[cid] = err
        return out
