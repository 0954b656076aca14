"""A node's disk copy of its private table: newest before a round, bounded history."""

import pytest
import torch

from fedmeta.runtime.private_store import PrivateStore


def test_load_takes_the_newest_table_before_the_round_and_old_files_go(tmp_path):
    store = PrivateStore(tmp_path, "social/0", keep=3)
    for r in range(1, 6):
        store.save(r, {"t": torch.full((2,), float(r))})
    assert store.rounds() == [3, 4, 5]
    rnd, tensors = store.load(before_round=5)
    assert rnd == 4 and torch.equal(tensors["t"], torch.full((2,), 4.0))
    assert store.load(before_round=3) is None           # round 2 was pruned, never guessed
    assert store.load(before_round=99)[0] == 5
    assert PrivateStore(tmp_path, "social/1").load(99) is None   # another client sees nothing


def test_keep_must_cover_a_resume():
    with pytest.raises(ValueError, match="keep"):
        PrivateStore("x", "c", keep=1)
