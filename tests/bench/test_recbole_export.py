"""The RecBole export is fedmeta's split, read back from the files RecBole will read.

Runs in fedmeta's venv only (RecBole is never imported): the atomic files are parsed as
plain text and compared with the ``ClientTasks`` the nodes build from the same overrides.
"""

from __future__ import annotations

import json

import pytest

from bench.peer import recbole_export as rx

OVERRIDES = ["data=synthetic_small", "data.max_eval_users=12", "seed=3"]
K_SHOT = 5   # data/synthetic_small.yaml's k_shot


def read_inter(path):
    lines = path.read_text().splitlines()
    assert lines[0] == rx.INTER_HEADER
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        assert len(fields) == 3 and all(f.strip() for f in fields), f"{path}:{n}: {line!r}"
        history = [int(t) for t in fields[1].split(" ")]
        rows.append((fields[0], history, int(fields[2])))
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("recbole-export")
    out = rx.export(OVERRIDES, root)
    clients = rx.client_tasks(rx.compose(OVERRIDES))
    sets = {}
    for d in out:
        base = root / d["dataset"]
        sets[d["domain"]] = {
            "split": {s: read_inter(base / f"{d['dataset']}.{s}.inter") for s in rx.SPLITS},
            "items": (base / f"{d['dataset']}.item").read_text().splitlines(),
            "manifest": json.loads((base / "manifest.json").read_text()),
            "clients": [c for c in clients if c.catalog.domain == d["domain"]]}
    return sets


def expected_eval(clients):
    """(fedmeta user, population) -> (history, targets, seen), straight from the tasks."""
    out = {}
    for c in clients:
        pops = ([("new-client", c.cold_eval)] if c.partition.new_client
                else [("warm", c.warm_eval), ("cold", c.cold_eval)])
        for pop, tasks in pops:
            for u, name in enumerate(tasks.users):
                out[(name, pop)] = (rx.eval_history(tasks, u), list(tasks.eval_targets[u]),
                                    list(tasks.seen[u]))
    return out


def test_every_domain_and_population_is_exported(exported):
    assert set(exported) == {"ecommerce", "social"}
    for got in exported.values():
        pops = got["manifest"]["populations"]
        assert all(pops[p]["users"] > 0 for p in ("warm", "cold", "new-client")), pops


def test_test_file_is_exactly_fedmetas_evaluation(exported):
    for got in exported.values():
        users = got["manifest"]["users"]
        rows: dict[tuple, tuple] = {}
        for tok, history, target in got["split"]["test"]:
            key = (users[tok]["user"], users[tok]["population"])
            hist, targets = rows.setdefault(key, (history, []))
            assert history == hist                  # one support per user, every target
            targets.append(target)
        want = expected_eval(got["clients"])
        assert set(rows) == set(want)               # same users, same populations
        for key, (history, targets) in rows.items():
            assert history == want[key][0]
            assert targets == want[key][1]          # same targets, same order
            assert len(history) <= got["manifest"]["max_len"] - 1


def test_manifest_excludes_what_fedmeta_excludes(exported):
    for got in exported.values():
        users = got["manifest"]["users"]
        want = expected_eval(got["clients"])
        for e in got["manifest"]["evaluated"]:
            key = (users[e["token"]]["user"], e["population"])
            assert (e["history"], e["targets"], e["seen"]) == want[key]
            assert not set(e["targets"]) & set(e["seen"])


def test_train_and_valid_hold_no_test_target_of_the_same_user(exported):
    for got in exported.values():
        held: dict[str, set] = {}
        for split in ("train", "valid"):
            for tok, history, target in got["split"][split]:
                held.setdefault(tok, set()).update(history + [target])
        for tok, _, target in got["split"]["test"]:
            assert target not in held.get(tok, set())


def test_train_is_what_fedmetas_learners_see(exported):
    for got in exported.values():
        users, m = got["manifest"]["users"], got["manifest"]
        valid = {tok: (h, t) for tok, h, t in got["split"]["valid"]}
        assert set(valid) == set(m["valid_users"])
        samples: dict[str, set] = {}
        for tok, history, target in got["split"]["train"]:
            samples.setdefault(tok, set()).add((tuple(history), target))
        by_name = {v["user"]: tok for tok, v in users.items()}
        for c in got["clients"]:
            for u, name in enumerate(c.train.users):
                seq = rx.task_sequence(c.train, u)
                tok = by_name[name]
                if tok in valid:    # leave-last-out: the last task item is the valid target
                    assert valid[tok] == (seq[:-1], seq[-1])
                    seq = seq[:-1]
                assert samples.get(tok, set()) == {(tuple(seq[:t]), seq[t])
                                                   for t in range(1, len(seq))}
            for u, name in enumerate(c.cold_eval.users):   # cold / new-client: k-shot support
                sup = rx.eval_history(c.cold_eval, u)
                assert 1 <= len(sup) <= K_SHOT
                assert samples.get(by_name[name], set()) == {(tuple(sup[:t]), sup[t])
                                                             for t in range(1, len(sup))}


def test_catalogue_and_tokens_have_no_missing_values(exported):
    for got in exported.values():
        n = got["manifest"]["n_items"]
        assert n == got["clients"][0].catalog.n_items
        assert got["items"] == ["item_id:token", *map(str, range(n))]
        for split in rx.SPLITS:
            assert got["split"][split], split
            for tok, history, target in got["split"][split]:
                assert tok in got["manifest"]["users"]
                assert history and all(0 <= i < n for i in history + [target])


def test_valid_slice_does_not_depend_on_who_is_evaluated(tmp_path):
    """Changing how many users are evaluated must not move the validation slice."""
    a = rx.export(OVERRIDES, tmp_path / "a")
    b = rx.export([*OVERRIDES, "data.max_eval_users=5"], tmp_path / "b")
    for da, db in zip(a, b):
        ma = json.loads((tmp_path / "a" / da["dataset"] / "manifest.json").read_text())
        mb = json.loads((tmp_path / "b" / db["dataset"] / "manifest.json").read_text())
        name = lambda m: {m["users"][t]["user"] for t in m["valid_users"]}  # noqa: E731
        assert name(ma) == name(mb) and name(ma)
        assert ma["populations"]["cold"]["users"] != mb["populations"]["cold"]["users"]


def test_empty_history_is_refused():
    with pytest.raises(rx.ExportError, match="u7"):
        rx._line(("u7", [], 3))
