"""Attack 9: the server sends one client's work to another client's node.

The attack. A server that addresses client A's instruction (A's id, and the arrays and
round meant for A) to the node serving B tries to make B train under A's name: B's update
would be booked as A's, and whatever the server keys per client (its round schedule, its
expectations of A's budget) would be applied to the wrong silo.

Now: the message names the client the server believes it is talking to; a node serving
another client refuses it (an error reply) for training and evaluation alike, before its
ledger is opened, and its query reply says which client it serves -- public facts only.
"""

from __future__ import annotations

from flwr.app import RecordDict

from tests.adversarial import server_play as sp

MINE, OTHER = "ecommerce-1", "ecommerce-0"


def test_other_clients_work_is_refused(fed, tmp_path):
    node = sp.make_node(fed, tmp_path / "node", MINE)
    before = sp.ledger_bytes(node)
    for claimed in (OTHER, "social-1", "", MINE.upper(), MINE + " "):
        for kind in ("train", "evaluate"):
            reply = sp.deliver(node, kind, sp.instruction(fed, 1, claimed))
            assert reply.refused and isinstance(reply.error, ValueError), (claimed, kind)
            assert "work to the node serving" in str(reply.error)
            assert sp.ledger_bytes(node) == before
    assert sp.private_files(node) == []

    described = sp.deliver(node, "query", RecordDict())
    assert not described.refused, described.error
    assert dict(described.message.content["meta"]) == {"client-id": MINE, "domain": "ecommerce",
                                                       "new-client": False}
    # power: its own client's work is accepted (and charged)
    assert not sp.train(fed, node, 1, MINE).refused
    assert sp.ledger_bytes(node) != before
