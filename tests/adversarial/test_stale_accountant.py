"""Attack 4: the node is made to train on a stale, missing or corrupt privacy ledger.

The attack. Spending a budget twice needs the node to forget what it spent: a restored
backup of the ledger (a copy taken after round 1, put back after round 2), a lost ledger
that a node silently recreates, or a corrupt one that it replaces with a fresh budget. In
the old code the server's copy of the accountant was exactly such a stale state, accepted by
any node that had restarted (see ``test_forged_accountant``).

Why it fails now. The ledger is written (fsync, rename) together with a high-water mark
file recording the highest release sequence number. A node opening a ledger older than the
mark, a missing ledger, an unreadable one, one of another client or one created with other
privacy settings refuses to train and leaves the files as they are; nothing is recreated.
``fedmeta-node reset-budget NODE --yes`` is the only way back, it is logged as a RESET and
counted in the ledger (``resets``).

What the high-water mark cannot see is also pinned down here: restoring *both* files from
the same backup rewinds the budget (the mark lives in the same directory). Only the node's
operator can do that; a server cannot write a node's disk. The test shows it so that the
stale-copy refusal is seen to rest on the mark alone.

Found by these tests and fixed: a corrupt high-water mark made ``reset-budget`` fail too,
with an error telling the operator to run ``reset-budget``.
"""

from __future__ import annotations

import json
import logging

import pytest

from fedmeta.data.silo import read_silo
from fedmeta.privacy.ledger import HWM, LEDGER, LedgerError, PrivacyLedger
from fedmeta.runtime.node import NodeConfig, build_tasks, experiment_view, plan_for
from fedmeta.tools.nodes import node_main
from tests.adversarial import server_play as sp

CLIENT = "ecommerce-0"


def _refused(fed, node, server_round, match):
    before = sp.ledger_bytes(node)
    reply = sp.train(fed, node, server_round, CLIENT)
    assert reply.refused, "the node trained on an untrustworthy ledger"
    assert isinstance(reply.error, LedgerError), reply.error
    assert match in str(reply.error), reply.error
    assert sp.ledger_bytes(node) == before          # nothing recreated, nothing charged


def _write(node, name, data: bytes | None):
    path = sp.state_dir(node) / name
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)


def _open_ledger(node):
    """The gate every DP round passes: the node opening its ledger from its own disk."""
    nc = NodeConfig.load(node)
    plan = plan_for(nc, experiment_view(nc), len(build_tasks(experiment_view(nc),
                                                             read_silo(nc.silo_dir)).train),
                    solve=False)
    return PrivacyLedger.open(nc.state_dir, nc.client_id, plan)


def test_stale_ledger_copy_is_refused_until_reset(fed, tmp_path, caplog):
    node = sp.make_node(fed, tmp_path / "node", CLIENT)
    assert not sp.train(fed, node, 1, CLIENT).refused
    after_round_1 = sp.ledger_bytes(node)
    assert not sp.train(fed, node, 2, CLIENT).refused
    after_round_2 = sp.ledger_bytes(node)
    spent = json.loads(after_round_2[0])
    assert spent["seq"] == 2 and spent["accountant"]["history"][0][2] == 2

    _write(node, LEDGER, after_round_1[0])          # the backup taken after round 1
    sp.restart_nodes()                              # a freshly started node process
    _refused(fed, node, 3, "high-water mark")

    # what the mark cannot see: the same backup of the ledger *and* the mark (an operator
    # restoring the whole state directory; a server cannot write the node's disk) opens
    # fine -- so the refusal above rests on the mark and nothing else
    _write(node, HWM, after_round_1[1])
    assert _open_ledger(node).steps_charged == 1
    _write(node, HWM, after_round_2[1])
    with pytest.raises(LedgerError, match="high-water mark"):
        _open_ledger(node)

    assert node_main(["reset-budget", str(node)]) == 2      # without --yes: nothing happens
    assert sp.ledger_bytes(node) == (after_round_1[0], after_round_2[1])
    assert node_main(["init", str(node)]) == 2              # init never overwrites a budget
    assert sp.ledger_bytes(node) == (after_round_1[0], after_round_2[1])
    with caplog.at_level(logging.WARNING, logger="fedmeta.privacy.ledger"):
        assert node_main(["reset-budget", str(node), "--yes"]) == 0
    assert any("RESET" in r.getMessage() and CLIENT in r.getMessage() for r in caplog.records)
    fresh = json.loads(sp.ledger_bytes(node)[0])
    assert fresh["resets"] == 1 and fresh["accountant"]["history"] == []
    assert fresh["seq"] >= spent["seq"]             # the sequence never goes back

    sp.restart_nodes()
    reply = sp.train(fed, node, 3, CLIENT)
    assert not reply.refused, reply.error
    assert json.loads(sp.ledger_bytes(node)[0])["seq"] == fresh["seq"] + 1


def test_missing_or_corrupt_ledger_is_refused(fed, tmp_path):
    node = sp.make_node(fed, tmp_path / "node", CLIENT)      # a budget, nothing spent yet
    good, good_hwm = sp.ledger_bytes(node)
    raw = json.loads(good)

    _write(node, LEDGER, None)
    _refused(fed, node, 1, "ledger was lost")
    assert sp.ledger_bytes(node)[0] is None          # not silently recreated

    def variant(**changes):
        return json.dumps({**raw, **changes}).encode()

    corrupt = {
        "garbage": b"\x00not json",
        "empty file": b"",
        "truncated": good[: len(good) // 2],
        "a list": b"[]",
        "other client": variant(client_id="ecommerce-1"),
        "other format": variant(format=99),
        "no accountant": json.dumps({k: v for k, v in raw.items() if k != "accountant"}).encode(),
        "forged accountant keys": variant(accountant={**raw["accountant"], "noise": 0}),
        "plan and accountant disagree": variant(plan={**raw["plan"], "delta": 0.5}),
    }
    for name, data in corrupt.items():
        _write(node, LEDGER, data)
        reply = sp.train(fed, node, 1, CLIENT)
        assert reply.refused and isinstance(reply.error, LedgerError), (name, reply.error)
        assert sp.ledger_bytes(node) == (data, good_hwm), name
    _write(node, LEDGER, good)
    _write(node, HWM, b"{]")
    _refused(fed, node, 1, "corrupt high-water mark")
    _write(node, HWM, good_hwm)
    assert not sp.train(fed, node, 1, CLIENT).refused   # the intact ledger works again


def test_changed_privacy_settings_are_refused(fed, tmp_path):
    """An operator who edits the node's privacy settings must reset the budget: a ledger
    keeps the settings it was created with, and other settings would make its sum wrong."""
    node = sp.make_node(fed, tmp_path / "node", CLIENT)
    cfg = json.loads(node.read_text())
    for change in ({"noise_multiplier": 0.5}, {"max_grad_norm": 10.0}, {"delta": 0.5},
                   {"mechanism": "prv"}):
        sp.restart_nodes()
        node.write_text(json.dumps({**cfg, "privacy": {**cfg["privacy"], **change}}))
        _refused(fed, node, 1, "differ from those its budget was created with")
    node.write_text(json.dumps(cfg))
    sp.restart_nodes()
    assert not sp.train(fed, node, 1, CLIENT).refused


def test_reset_recovers_from_a_corrupt_high_water_mark(fed, tmp_path):
    node = sp.make_node(fed, tmp_path / "node", CLIENT)
    _write(node, HWM, b"garbage")
    with pytest.raises(LedgerError, match="corrupt high-water mark"):
        _open_ledger(node)                               # the node refuses: right
    assert node_main(["reset-budget", str(node), "--yes"]) == 0     # ... and is stuck
    assert _open_ledger(node).steps_charged == 0
