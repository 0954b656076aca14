"""The Flower apps on an in-process grid (no Ray, no SuperLink): Flower is only transport.

Every test goes through the production ClientApp and ServerApp with the node files the
simulation engine writes; faults come from a test mod (``tests/server/loopback.py``).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import clients.app as client_module
from fedmeta.runtime import inprocess
from fedmeta.runtime.hydra_config import compose
from server.transport import FederationMismatch
from tests.server import loopback

TINY = ["data=synthetic_small", "model=tiny", "runtime.rounds=2", "algorithm.local_steps=1",
        "algorithm.users_per_step=4", "algorithm.negatives=8", "algorithm.inner_steps=1",
        "data.max_eval_users=2", "runtime.plots=false",
        # user-level DP in the nodes; the node's own secret makes the runs comparable bit for bit
        "privacy=local", "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0",
        "privacy.local.reproducible_secret=a-test-secret-of-24-chars"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like a Ray actor with num_cpus=1; keeps these tests fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(directory):
    frame = pd.read_csv(directory / "metrics.csv")
    return frame.sort_values(list(frame.columns[:-1])).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess")
    summary = inprocess.run(compose(TINY + ["runtime=inprocess"]), out, echo=lambda s: None)
    return summary, out


def test_flower_apps_reproduce_the_inprocess_run(reference, tmp_path):
    summary, out = reference
    flower, grid = loopback.flower_run(compose(TINY + ["runtime=simulation"]), tmp_path)
    pd.testing.assert_frame_equal(_rows(out), _rows(tmp_path))
    assert flower["client_epsilon"] == summary["client_epsilon"]
    assert flower["runtime"] == "flower" and summary["runtime"] == "inprocess"
    assert {"query", "train", "evaluate"} <= set(grid.sent)


@pytest.mark.slow
def test_resume_after_a_restart_equals_the_uninterrupted_run(reference, tmp_path):
    _, out = reference
    cfg = compose(TINY + ["runtime=simulation"])
    loopback.flower_run(cfg, tmp_path, stop_after=1)
    assert not (tmp_path / "summary.json").exists()
    # a new grid, new node processes (cache cleared): nodes resume from their own disks
    loopback.flower_run(compose(TINY + ["runtime=simulation", "runtime.resume=true"]), tmp_path)
    pd.testing.assert_frame_equal(_rows(out), _rows(tmp_path))


def test_failing_nan_and_misshaped_clients_are_dropped_and_counted(tmp_path):
    loopback.FAULTS.update({"ecommerce-0": "raise", "social-0": "nan", "social-1": "shape"})
    try:
        summary, _ = loopback.flower_run(compose(TINY + ["runtime=simulation"]), tmp_path,
                                         app=loopback.fault_app)
    finally:
        loopback.FAULTS.clear()
    for r in summary["rounds"]:
        assert set(r["failures"]) == {"ecommerce-0", "social-0", "social-1"}
        assert "injected failure" in r["failures"]["ecommerce-0"]
        assert "NaN" in r["failures"]["social-0"] and "shape" in r["failures"]["social-1"]
        assert r["accepted"] == ["ecommerce-1"]
    assert summary["failures_total"] == 6


def test_more_supernodes_than_clients_fail_the_run_with_the_count(tmp_path):
    with pytest.raises(FederationMismatch, match="SuperNodes are connected but the federation has 6"):
        loopback.flower_run(compose(TINY + ["runtime=simulation"]), tmp_path, extra_nodes=1)


def test_a_node_refuses_work_meant_for_another_client(tmp_path):
    from fedmeta.config import run_config
    from fedmeta.data.silo import read_manifest
    from fedmeta.runtime.federation import initial_parameters
    import wire
    from server.simulate import prepare

    cfg = compose(TINY + ["runtime=simulation"])
    silo_root, nodes_dir = prepare(cfg, tmp_path)
    client_module._nodes.clear()
    grid = loopback.LoopbackGrid(client_module.app, 1, {0: {"fedmeta-node": str(nodes_dir / "node-0.json")}})
    from flwr.app import Message, MessageType

    catalogues = read_manifest(silo_root)[1]
    msg = Message(wire.instruction(initial_parameters(cfg, catalogues=catalogues), 1,
                                   run_config(cfg, catalogues), "social-2"),
                  dst_node_id=100, message_type=MessageType.TRAIN)
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "social-2" in reply.error.reason
    lost = loopback.LoopbackGrid(client_module.app, 1, {0: {"partition-id": 0}})
    lost.ctx[100].node_config.pop("partition-id")
    reply = lost.send_and_receive([Message(wire.instruction(initial_parameters(cfg, catalogues=catalogues), 1, {}, "x"),
                                           dst_node_id=100, message_type=MessageType.TRAIN)])[0]
    assert reply.has_error() and "fedmeta-node" in reply.error.reason


@pytest.mark.slow
def test_private_tables_stay_on_the_nodes_and_survive_a_restart(tmp_path):
    cfg = compose(TINY + ["runtime=simulation", "model.private_item_embeddings=true"])
    summary, _ = loopback.flower_run(cfg, tmp_path)
    from safetensors.torch import load_file

    from fedmeta.model.recommender import PRIVATE_PREFIX

    sent = load_file(str(tmp_path / "checkpoint" / "meta_parameters.safetensors"))
    assert sent and not any(k.startswith(PRIVATE_PREFIX) for k in sent)
    tables = list((tmp_path / "nodes").rglob("private_r*.safetensors"))
    assert {p.parts[-3] for p in tables} == {"ecommerce-0", "ecommerce-1", "social-0", "social-1"}
    assert all(k.startswith(PRIVATE_PREFIX) for p in tables for k in load_file(str(p)))
    assert summary["final_metrics"]
