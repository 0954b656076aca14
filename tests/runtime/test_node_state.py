"""A node's disk: one owner per state directory; the private table's newest-before-round rule."""

import json

import pytest
import torch

from fedmeta.config import ConfigError
from fedmeta.privacy.ledger import LedgerError
from fedmeta.runtime.node_state import OWNER, NodeState, PrivateTable


def test_load_takes_the_newest_table_before_the_round_and_old_files_go(tmp_path):
    table = NodeState(tmp_path / "a", "social/0").private_table(keep=3)
    for r in range(1, 6):
        table.save(r, {"t": torch.full((2,), float(r))})
    assert table.rounds() == [3, 4, 5]
    rnd, tensors = table.load(before_round=5)
    assert rnd == 4 and torch.equal(tensors["t"], torch.full((2,), 4.0))
    assert table.load(before_round=3) is None           # round 2 was pruned, never guessed
    assert table.load(before_round=99)[0] == 5
    assert NodeState(tmp_path / "b", "social/1").private_table().load(99) is None


def test_keep_must_cover_a_resume():
    with pytest.raises(ValueError, match="keep"):
        PrivateTable("x", keep=1)


def test_a_state_directory_serves_one_client(tmp_path):
    NodeState(tmp_path, "ecommerce/0").private_table().save(1, {"t": torch.ones(1)})
    assert NodeState(tmp_path, "ecommerce/0").summary().private_rounds == (1,)   # same owner
    with pytest.raises(ConfigError, match="belongs to client 'ecommerce/0'"):
        NodeState(tmp_path, "social/0")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1}),
                                     json.dumps({"format": 99, "client_id": "c"})])
def test_an_unreadable_owner_file_is_refused_not_overwritten(tmp_path, content):
    (tmp_path / OWNER).write_text(content)
    with pytest.raises(ConfigError, match="state_dir"):
        NodeState(tmp_path, "c")
    assert (tmp_path / OWNER).read_text() == content


def test_the_ledger_lives_in_the_node_state(tmp_path):
    from fedmeta.privacy.ledger import DPPlan

    state = NodeState(tmp_path, "c")
    plan = DPPlan("rdp", 1e-3, 8.0, 1.0, 0.01, 1.2)
    with pytest.raises(LedgerError, match="no privacy ledger"):
        state.ledger(plan)
    state.create_ledger(plan)
    assert state.summary().has_ledger and state.ledger(plan).steps_charged == 0
    with pytest.raises(LedgerError, match="already exists"):
        state.create_ledger(plan)
