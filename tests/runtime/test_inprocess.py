"""The in-process runtime: outputs, exact resume, refused resume, faulty clients dropped."""

import json

import pandas as pd
import pytest
import torch

from fedmeta.config import ConfigError
from fedmeta.runtime import inprocess
from fedmeta.runtime.federation import build_silos, load_data
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.node import Node

BASE = ["runtime=inprocess", "data=synthetic_small", "data.synthetic.ecommerce_users=60",
        "data.synthetic.social_users=60", "algorithm.local_steps=1", "algorithm.users_per_step=6",
        "runtime.rounds=3", "runtime.eval_every=1", "data.max_eval_users=6"]
PLAIN = BASE + ["privacy=none"]
SECRET = "privacy.local.reproducible_secret=a-test-secret-of-24-chars"


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def _run(cfg, out, data, **kw):
    nodes = inprocess.build_nodes(cfg, out, build_silos(cfg, data))
    return inprocess.run(cfg, out, nodes=nodes, echo=lambda s: None, **kw)


def test_outputs_are_written(tmp_path, data):
    summary = _run(compose(PLAIN), tmp_path, data)
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert list(frame.columns) == ["round", "phase", "population", "stage", "domain", "client",
                                   "metric", "value"]
    assert set(frame["round"]) == {1, 2, 3}
    assert {"warm", "cold", "new-client"} <= set(frame["population"])
    assert {"before", "after"} <= set(frame["stage"].dropna())
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_metrics"]["ecommerce"]["cold"]["after"]["ndcg@10"] >= 0
    assert len(saved["rounds"]) == 3 and all(r["bytes_received"] > 0 for r in saved["rounds"])
    assert (tmp_path / "checkpoint" / "meta_parameters.safetensors").exists()
    assert any((tmp_path / "plots").glob("*.png"))
    assert summary["failures_total"] == 0


def _final(directory):
    frame = pd.read_csv(directory / "metrics.csv")
    return frame.sort_values(list(frame.columns[:-1])).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["none", "local"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, data, privacy):
    over = BASE + [f"privacy={privacy}", "algorithm.server_optimizer=adam", "algorithm.server_lr=0.01"]
    if privacy == "local":                     # bit-for-bit needs the node's own secret
        over.append(SECRET)
    cfg = compose(over)
    _run(cfg, tmp_path / "full", data)
    _run(cfg, tmp_path / "cut", data, stop_after=1)     # "killed" after round 1's checkpoint
    assert not (tmp_path / "cut" / "metrics.csv").exists()
    resumed = compose(over + ["runtime.resume=true"])
    _run(resumed, tmp_path / "cut", data)
    pd.testing.assert_frame_equal(_final(tmp_path / "full"), _final(tmp_path / "cut"))
    if privacy == "local":
        a = json.loads((tmp_path / "full" / "summary.json").read_text())
        b = json.loads((tmp_path / "cut" / "summary.json").read_text())
        assert a["client_epsilon"] == b["client_epsilon"]
        assert all(v > 0 for v in a["client_epsilon"].values())
        assert not any(a["private_against_server"].values())   # marked: a secret was used


def test_resume_with_a_different_config_is_refused_naming_the_keys(tmp_path, data):
    cfg = compose(PLAIN)
    _run(cfg, tmp_path, data, stop_after=1)
    changed = compose(BASE + ["privacy=local", "runtime.rounds=2", "runtime.resume=true"])
    with pytest.raises(ConfigError, match=r"runtime\.rounds.*|privacy\.local\.enabled"):
        _run(changed, tmp_path, data)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_failing_and_nan_clients_are_dropped_and_counted(tmp_path, data, monkeypatch):
    cfg = compose(PLAIN)
    nodes = inprocess.build_nodes(cfg, tmp_path, build_silos(cfg, data))
    ids = [n.client_id for n in nodes if not n.tasks.partition.new_client]
    broken, poisoned = ids[0], ids[1]
    original = Node.train

    def faulty(self, params, server_round, run):
        if self.client_id == broken:
            raise RuntimeError("disk on fire")
        update = original(self, params, server_round, run)
        if self.client_id == poisoned:
            next(iter(update.delta.values()))[0].fill_(float("nan"))
        return update

    monkeypatch.setattr(Node, "train", faulty)
    summary = inprocess.run(cfg, tmp_path, nodes=nodes, echo=lambda s: None)
    assert summary["failures_total"] == 2 * cfg.runtime.rounds
    for r in summary["rounds"]:
        assert set(r["failures"]) == {broken, poisoned}
        assert "NaN" in r["failures"][poisoned] and "disk on fire" in r["failures"][broken]
        assert broken not in r["accepted"] and len(r["accepted"]) == len(ids) - 2
    assert all(torch.isfinite(torch.tensor(v)) for v in
               pd.read_csv(tmp_path / "metrics.csv").query("phase == 'eval'")["value"])


@pytest.mark.slow
def test_dp_off_equals_the_non_private_path_exactly(tmp_path, data):
    a = compose(BASE + ["privacy=none"])
    b = compose(BASE + ["privacy=local", "privacy.local.enabled=false"])
    _run(a, tmp_path / "a", data)
    _run(b, tmp_path / "b", data)
    pd.testing.assert_frame_equal(_final(tmp_path / "a"), _final(tmp_path / "b"))


@pytest.mark.slow
def test_central_dp_runs_in_process_and_reports_client_level_epsilon(tmp_path, data):
    cfg = compose(BASE + ["privacy=central", "runtime.rounds=2"])
    summary = _run(cfg, tmp_path, data)
    central = summary["central_dp"]
    assert central["sampling_amplification"] is False and central["delta"] == 1e-5
    assert 0 < central["epsilon"] < float("inf")
    assert all(r["central_dp"]["released"] for r in summary["rounds"])
