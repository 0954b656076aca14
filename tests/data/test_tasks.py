"""User tasks: temporal support/query split, de-duplication, k-shot evaluation sets."""

import pandas as pd
import torch

from fedmeta.data.partition import ClientPartition
from fedmeta.data.tasks import (MAX_EVAL_TARGETS, build_client_tasks, eval_tasks, training_tasks,
                                user_sequences)
from tests.helpers import toy_catalog


def test_sequences_are_time_ordered_and_deduplicated():
    cat = toy_catalog(10)
    frame = pd.DataFrame({"user": ["u", "u", "u", "u", "v"],
                          "item": ["i003", "i001", "i003", "i002", "i005"],
                          "timestamp": [3.0, 1.0, 5.0, 4.0, 1.0]})
    seqs = user_sequences(frame, cat)
    assert seqs == {"u": [1, 3, 2], "v": [5]}


def test_training_rows_shift_targets_and_split_support_query():
    cat = toy_catalog(10)
    t = training_tasks(["u"], {"u": [4, 5, 6, 7, 8, 9]}, cat, max_len=8, support_fraction=0.5, n_test=2)
    # n_test=2 holds out [8, 9]; history [4, 5, 6, 7]; support = first 2 targets
    assert t.inputs[0, :4].tolist() == [cat.bos, 4, 5, 6]
    assert t.targets[0, :4].tolist() == [4, 5, 6, 7]
    assert t.support[0].tolist()[:4] == [True, True, False, False]
    assert t.query[0].tolist()[:4] == [False, False, True, True]
    assert not t.support[0, 4:].any() and not t.query[0, 4:].any()
    assert (t.inputs[0, 4:] == cat.pad).all()


def test_short_users_form_no_training_task():
    cat = toy_catalog(10)
    t = training_tasks(["a", "b"], {"a": [1, 2], "b": [1, 2, 3, 4]}, cat, 8, 0.5, n_test=1)
    assert t.users == ["b"]


def test_eval_set_ranks_only_unseen_later_items_from_the_last_support_position():
    cat = toy_catalog(30)
    seq = list(range(20))
    t = eval_tasks(["u"], {"u": seq}, cat, max_len=10, support_len=lambda s: 3, label="cold")
    assert t.eval_targets == [list(range(3, 3 + MAX_EVAL_TARGETS))]
    assert t.seen == [[0, 1, 2]]
    pos = int(t.eval_pos[0])
    assert pos == 3 and t.inputs[0, pos] == 2        # the position that has seen the whole support
    assert t.support[0].sum() == 3 and not t.query[0].any()


def test_warm_eval_uses_history_and_cold_eval_k_shot():
    cat = toy_catalog(30)
    seqs = {f"u{i}": list(range(i, i + 12)) for i in range(4)}
    part = ClientPartition("toy-0", "toy", ("u0", "u1"), ("u2", "u3"), False)
    c = build_client_tasks(part, seqs, cat, max_len=20, support_fraction=0.5, n_test=2, k_shot=3)
    assert c.train.users == ["u0", "u1"] and c.num_tasks == 2
    assert [len(x) for x in c.warm_eval.seen] == [10, 10]
    assert [len(x) for x in c.warm_eval.eval_targets] == [2, 2]
    assert [len(x) for x in c.cold_eval.seen] == [3, 3]


def test_new_client_has_no_training_tasks():
    cat = toy_catalog(30)
    seqs = {"u0": list(range(10))}
    part = ClientPartition("toy-1", "toy", (), ("u0",), True)
    c = build_client_tasks(part, seqs, cat, 20, 0.5, 2, 3)
    assert c.num_tasks == 0 and len(c.cold_eval) == 1 and len(c.warm_eval) == 0


def test_subset_keeps_rows_aligned():
    cat = toy_catalog(30)
    t = training_tasks(["a", "b", "c"], {"a": [1, 2, 3], "b": [4, 5, 6, 7], "c": [8, 9, 10]},
                       cat, 8, 0.5, 0)
    s = t.subset([2, 0])
    assert s.users == ["c", "a"] and torch.equal(s.targets[0], t.targets[2])
