"""The in-process runtime: outputs, exact resume, and faulty clients dropped and counted."""

import json

import pandas as pd
import pytest
import torch

from fedmeta.runtime import inprocess
from fedmeta.runtime.client import ClientRunner
from fedmeta.runtime.federation import build_federation, load_data
from fedmeta.runtime.hydra_config import compose

BASE = ["runtime=inprocess", "data=synthetic_small", "data.synthetic.ecommerce_users=60",
        "data.synthetic.social_users=60", "algorithm.local_steps=1", "algorithm.users_per_step=6",
        "runtime.rounds=3", "runtime.eval_every=1", "data.max_eval_users=6"]
PLAIN = BASE + ["privacy=none"]


@pytest.fixture(scope="module")
def data():
    return load_data(compose(BASE))


def test_outputs_are_written(tmp_path, data):
    cfg = compose(PLAIN)
    summary = inprocess.run(cfg, tmp_path, fed=build_federation(cfg, data), echo=lambda s: None)
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


@pytest.mark.parametrize("privacy", ["none", "local"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, data, privacy):
    over = BASE + [f"privacy={privacy}", "algorithm.server_optimizer=adam", "algorithm.server_lr=0.01"]
    cfg = compose(over)
    inprocess.run(cfg, tmp_path / "full", fed=build_federation(cfg, data), echo=lambda s: None)
    # "kill" after round 1: the process stops with only the round-1 checkpoint on disk
    inprocess.run(cfg, tmp_path / "cut", fed=build_federation(cfg, data), stop_after=1,
                  echo=lambda s: None)
    assert not (tmp_path / "cut" / "metrics.csv").exists()
    resumed = compose(over + ["runtime.resume=true"])
    inprocess.run(resumed, tmp_path / "cut", fed=build_federation(resumed, data), echo=lambda s: None)
    pd.testing.assert_frame_equal(_final(tmp_path / "full"), _final(tmp_path / "cut"))
    if privacy == "local":
        a = json.loads((tmp_path / "full" / "summary.json").read_text())["client_epsilon"]
        b = json.loads((tmp_path / "cut" / "summary.json").read_text())["client_epsilon"]
        assert a == b and all(v > 0 for v in a.values())


def test_failing_and_nan_clients_are_dropped_and_counted(tmp_path, data, monkeypatch):
    cfg = compose(PLAIN)
    fed = build_federation(cfg, data)
    ids = [c.client_id for c in fed.training_clients]
    broken, poisoned = ids[0], ids[1]
    original = ClientRunner.train

    def faulty(self, params, server_round, state=None, private=None):
        if self.client_id == broken:
            raise RuntimeError("disk on fire")
        update, state = original(self, params, server_round, state, private)
        if self.client_id == poisoned:
            next(iter(update.delta.values()))[0].fill_(float("nan"))
        return update, state

    monkeypatch.setattr(ClientRunner, "train", faulty)
    summary = inprocess.run(cfg, tmp_path, fed=fed, echo=lambda s: None)
    assert summary["failures_total"] == 2 * cfg.runtime.rounds
    for r in summary["rounds"]:
        assert set(r["failures"]) == {broken, poisoned}
        assert "NaN" in r["failures"][poisoned] and "disk on fire" in r["failures"][broken]
        assert broken not in r["accepted"] and len(r["accepted"]) == len(ids) - 2
    assert all(torch.isfinite(torch.tensor(v)) for v in
               pd.read_csv(tmp_path / "metrics.csv").query("phase == 'eval'")["value"])


def test_dp_off_equals_the_non_private_path_exactly(tmp_path, data):
    a = compose(BASE + ["privacy=none"])
    b = compose(BASE + ["privacy=local", "privacy.local.enabled=false"])
    inprocess.run(a, tmp_path / "a", fed=build_federation(a, data), echo=lambda s: None)
    inprocess.run(b, tmp_path / "b", fed=build_federation(b, data), echo=lambda s: None)
    pd.testing.assert_frame_equal(_final(tmp_path / "a"), _final(tmp_path / "b"))
