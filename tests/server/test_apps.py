"""The Flower apps on an in-process grid (no Ray, no SuperLink): Flower must only be transport.

A loopback ``Grid`` hands each message straight to the ClientApp with that node's ``Context``;
the ServerApp's loop, the meta-strategy and the ClientApp run unchanged. A new grid has empty
``Context.state``s, which is what a restarted simulation looks like to the clients.
"""

from __future__ import annotations

import json
import shutil
import math
import time
import uuid

import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import (GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig,
                            RdpAccountant, SamplingMethod)
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from clients.app import central_clipping_mod, federation_for
from fedmeta.algorithms.base import ClientUpdate
from fedmeta.runtime import inprocess
from fedmeta.runtime.hydra_config import compose
from fedmeta.runtime.server import MetaServer
from server.app import run_server
from server.codec import from_array_record, records_to_rows, to_array_record, update_to_content
from server.strategy import ClientInfo, Directory, MetaStrategy

TINY = ["data=synthetic_small", "model=tiny", "runtime.rounds=2", "algorithm.local_steps=1",
        "algorithm.users_per_step=4", "algorithm.negatives=8", "algorithm.inner_steps=1",
        "data.max_eval_users=2", "runtime.plots=false",
        # user-level DP inside the clients: gives them state that must survive restarts
        "privacy=local", "privacy.local.target_epsilon=null", "privacy.local.noise_multiplier=1.0"]
N_CLIENTS = 6        # synthetic_small: 3 e-commerce + 3 social clients, one of each held out


class LoopbackGrid(Grid):
    def __init__(self, app, num_nodes: int, node_config: dict[int, dict] | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = app
        self.ctx = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                     node_config={"partition-id": i, "num-partitions": num_nodes,
                                                  **(node_config or {}).get(i, {})})
                    for i in range(num_nodes)}
        self.sent: list[str] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def get_node_ids(self):
        return list(self.ctx)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(m.metadata.message_type)
            try:
                out.append(self.app(m, self.ctx[m.metadata.dst_node_id]))
            except Exception as err:  # what every Flower runtime does with a raising ClientApp
                out.append(Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=m))
        return out


def instruction(kind: str, content: RecordDict) -> Message:
    md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=7,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                  message_type=kind)
    return Message(content, metadata=md)


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == pytest.approx(b, abs=1e-6), path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like a Ray actor with num_cpus=1; keeps these tests fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess")
    summary = inprocess.run(compose(TINY), out, echo=lambda line: None)
    return summary, pd.read_csv(out / "metrics.csv")


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower")
    grid = LoopbackGrid(client_app, N_CLIENTS)
    summary = run_server(grid, {"overrides": " ".join(TINY), "output-dir": str(out)},
                         echo=lambda line: None)
    return summary, pd.read_csv(out / "metrics.csv"), out, grid


# ---- the ClientApp called directly --------------------------------------------------------
def _train_msg(params, server_round, cid, **extra):
    cfg = ConfigRecord({"server-round": server_round, "fedmeta.overrides": json.dumps(TINY),
                        "fedmeta.client-id": cid, **extra})
    return instruction("train", RecordDict({"arrays": to_array_record(params), "config": cfg}))


def test_client_app_trains_evaluates_and_keeps_state_in_context():
    fed = federation_for(tuple(TINY))
    cid = fed.clients[3].client_id                      # a social training client
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(),
                  run_config={})
    params = fed.initial_parameters()
    reply = client_app(_train_msg(params, 1, cid), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["meta"]["client-id"] == cid and cid.startswith("social")
    assert reply.content["metrics"]["num-examples"] == fed.client(cid).num_tasks
    local = from_array_record(reply.content["arrays"])
    assert list(local) == list(params) and not torch.equal(local[next(iter(local))],
                                                           params[next(iter(params))])
    first = json.loads(ctx.state["fedmeta"]["state"])
    assert ctx.state["fedmeta"]["round"] == 1 and first["epsilon"] > 0

    reply2 = client_app(_train_msg(params, 2, cid), ctx)    # same node: accountant continues
    second = json.loads(ctx.state["fedmeta"]["state"])
    assert second["epsilon"] > first["epsilon"]
    assert json.loads(reply2.content["meta"]["state"]) == second

    ev = client_app(instruction("evaluate", RecordDict({
        "arrays": to_array_record(params), "config": ConfigRecord({
            "server-round": 2, "fedmeta.overrides": json.dumps(TINY), "fedmeta.client-id": cid})})),
        ctx)
    rows = records_to_rows(ev.content)
    assert rows and {r["client"] for r in rows} == {cid} and {r["round"] for r in rows} == {2}
    assert {"warm", "cold"} <= {r["population"] for r in rows}


def test_client_app_takes_the_servers_newer_state_after_a_restart():
    fed = federation_for(tuple(TINY))
    cid = fed.clients[0].client_id
    params = fed.initial_parameters()
    old = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})
    saved = json.loads(client_app(_train_msg(params, 1, cid), old).content["meta"]["state"])
    fresh = Context(run_id=1, node_id=8, node_config={"partition-id": 0}, state=RecordDict(),
                    run_config={})
    client_app(_train_msg(params, 2, cid, **{"fedmeta.state": json.dumps(saved),
                                             "fedmeta.state-round": 1}), fresh)
    resumed = json.loads(fresh.state["fedmeta"]["state"])
    client_app(_train_msg(params, 2, cid), old)        # the node that never lost its state
    assert resumed == json.loads(old.state["fedmeta"]["state"])


def test_client_app_refuses_work_meant_for_another_client_and_bad_partitions():
    fed = federation_for(tuple(TINY))
    params = fed.initial_parameters()
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})
    # (the runtimes turn a handler's exception into an error reply; called directly, it raises)
    with pytest.raises(ValueError, match=fed.clients[1].client_id):
        client_app(_train_msg(params, 1, fed.clients[1].client_id), ctx)
    ctx.node_config["partition-id"] = N_CLIENTS
    with pytest.raises(ValueError, match="partition-id"):
        client_app(_train_msg(params, 1, "x"), ctx)


# ---- ServerApp + ClientApp vs the in-process reference -----------------------------------
def test_flower_apps_reproduce_the_inprocess_run(reference, flower):
    ref, ref_rows = reference
    got, rows, out, grid = flower
    _close(ref["final_metrics"], got["final_metrics"])
    _close(ref["client_epsilon"], got["client_epsilon"])
    key = ["round", "phase", "population", "stage", "client", "metric"]
    a = ref_rows.sort_values(key).reset_index(drop=True)
    b = rows.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
    # only training clients train; everyone is evaluated; bytes come from the records
    assert grid.sent.count("train") == 2 * 4 and grid.sent.count("evaluate") == N_CLIENTS
    assert grid.sent.count("query") == N_CLIENTS
    r1 = got["rounds"][0]
    assert r1["bytes_sent"] > 0 and r1["bytes_received"] == r1["bytes_sent"]
    assert got["rounds"][-1]["bytes_sent_eval"] == r1["bytes_sent"] // 4 * N_CLIENTS
    assert {p.name for p in out.iterdir()} >= {"metrics.csv", "summary.json", "checkpoint"}


def test_resume_after_a_restart_equals_the_uninterrupted_run(reference, tmp_path):
    out = str(tmp_path / "run")
    first = run_server(LoopbackGrid(client_app, N_CLIENTS),
                       {"overrides": " ".join(TINY), "output-dir": out, "stop-after": 1},
                       echo=lambda line: None)
    assert first == {"stopped_at": 1}
    lines = []
    fresh = LoopbackGrid(client_app, N_CLIENTS)          # new nodes: empty Context.state
    resumed = run_server(fresh, {"overrides": " ".join(TINY + ["runtime.resume=true"]),
                                 "output-dir": out}, echo=lines.append)
    assert lines[0].startswith("resuming from round 1")
    assert fresh.sent.count("train") == 4                # only round 2 ran
    _close(reference[0]["final_metrics"], resumed["final_metrics"])
    # the DP accountants continued from the checkpointed state, not from zero
    _close(reference[0]["client_epsilon"], resumed["client_epsilon"])


def test_failing_and_nan_clients_are_dropped_and_counted(tmp_path):
    overrides = [o for o in TINY if not o.startswith("privacy")] + ["privacy=none",
                                                                     "runtime.rounds=1"]
    faults = {0: {"fault": "raise"}, 3: {"fault": "nan"}, 1: {"fault": "shape"}}
    summary = run_server(LoopbackGrid(client_app, N_CLIENTS, faults),
                         {"overrides": " ".join(overrides), "output-dir": str(tmp_path)},
                         echo=lambda line: None)
    fed = federation_for(tuple(overrides))
    ids = [c.client_id for c in fed.clients]
    failures = summary["rounds"][0]["failures"]
    assert set(failures) == {ids[0], ids[1], ids[3]}
    assert "injected failure" in failures[ids[0]]
    assert "NaN" in failures[ids[3]] and "shape" in failures[ids[1]]
    assert summary["failures_total"] == 3 and summary["rounds"][0]["accepted"] == [ids[4]]
    evaluated = pd.read_csv(tmp_path / "metrics.csv").query("phase == 'eval'")["client"]
    assert set(evaluated) == set(ids)                    # the run went on to evaluate everyone


# ---- central DP inside the meta-strategy (stub clients with known updates) ----------------
DELTAS = {"a": [3.0, 4.0, 0.0, 0.0], "b": [0.0, 0.0, 0.6, 0.8], "c": [0.3, 0.4, 0.0, 0.0],
          "d": [0.0, 0.0, 0.0, 0.5]}
TASKS = {"a": 1, "b": 10, "c": 100, "d": 5}
CLIPPED_MEAN = [0.225, 0.3, 0.15, 0.325]      # each clipped to norm 1, then a *uniform* mean

stub = ClientApp()


@stub.train(mods=[central_clipping_mod])
def _stub_train(msg, ctx):
    cid = msg.content["config"]["fedmeta.client-id"]
    if ctx.node_config.get("fault") == "raise":
        raise RuntimeError("boom")
    glob = from_array_record(msg.content["arrays"])
    update = ClientUpdate({"w": torch.tensor(DELTAS[cid])}, TASKS[cid], {"loss": 1.0})
    return Message(update_to_content(update, glob, cid, {}), reply_to=msg)


def _dp_round(side, clipping, sigma, server_lr=0.5, faults=None):
    cfg = compose(["privacy=central", f"privacy.central.side={side}",
                   f"privacy.central.clipping={clipping}", f"privacy.central.noise_multiplier={sigma}",
                   "privacy.central.clipping_norm=1.0", f"algorithm.server_lr={server_lr}"])
    directory = Directory(num_clients=5)
    for i, cid in enumerate(["a", "b", "c", "d", "new"]):
        directory.clients[cid] = ClientInfo(cid, "toy", cid == "new", i)
        directory.node_of[cid] = 100 + i
    strategy = MetaStrategy(cfg, [], MetaServer(cfg, {"w": torch.zeros(4)}), directory)
    grid = LoopbackGrid(stub, 5, faults)
    msgs = list(strategy.configure_train(1, to_array_record(strategy.server.params),
                                         ConfigRecord(), grid))
    strategy.aggregate_train(1, grid.send_and_receive(msgs))
    return strategy, msgs


def _epsilon(sigma, rounds=1, n=4):
    acc = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=n,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                      sampling_method=SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=n, population_size=n),
                count=rounds)
    return acc.get_privacy_spent().epsilon


@pytest.mark.parametrize("side", ["server", "client"])
def test_central_dp_clips_averages_uniformly_then_applies_the_server_optimiser(side):
    strategy, msgs = _dp_round(side, "fixed", 1e-6)
    assert [m.metadata.dst_node_id for m in msgs] == [100, 101, 102, 103]   # never the new client
    if side == "client":
        assert all(m.content["config"]["clipping_norm"] == 1.0 for m in msgs)
    expected = -0.5 * torch.tensor(CLIPPED_MEAN)     # server SGD, lr 0.5, on the noisy mean
    assert torch.allclose(strategy.server.params["w"], expected, atol=1e-4)
    assert strategy.log.central["released"] and strategy.central.in_wrapper


def test_central_dp_noise_is_seeded_per_round_and_epsilon_comes_from_flowers_accountant():
    one, _ = _dp_round("server", "fixed", 1.0)
    two, _ = _dp_round("server", "fixed", 1.0)
    assert torch.equal(one.server.params["w"], two.server.params["w"])
    assert not torch.allclose(one.server.params["w"], -0.5 * torch.tensor(CLIPPED_MEAN), atol=1e-3)
    assert one.log.central["epsilon"] == pytest.approx(_epsilon(1.0))
    adaptive, _ = _dp_round("server", "adaptive", 0.3)   # no accountant in Flower's wrapper
    assert not adaptive.central.in_wrapper
    assert adaptive.log.central["epsilon"] == pytest.approx(_epsilon(0.3))
    assert adaptive.central.epsilon_after(3) == pytest.approx(_epsilon(0.3, rounds=3))


def test_central_dp_round_with_a_failed_client():
    fixed, _ = _dp_round("server", "fixed", 1.0, faults={1: {"fault": "raise"}})
    assert set(fixed.log.failures) == {"b"}
    # Flower's accountant refuses a short round: nothing released, nothing spent
    assert not fixed.log.central["released"] and torch.equal(fixed.server.params["w"], torch.zeros(4))
    assert fixed.log.central["epsilon"] == 0.0
    adaptive, _ = _dp_round("server", "adaptive", 0.3, faults={1: {"fault": "raise"}})
    assert set(adaptive.log.failures) == {"b"} and adaptive.log.central["released"]
    assert adaptive.log.central["participants"] == ["a", "c", "d"]


def test_adaptive_clipping_noise_too_large_for_the_sample_is_a_config_error():
    from fedmeta.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.central.noise_multiplier"):
        _dp_round("server", "adaptive", 1.0)


# ---- private item tables: Context.state and the node's own disk, never the wire -----------
class RecordingGrid(LoopbackGrid):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        out = super().send_and_receive(messages)
        self.replies += out
        return out


def test_private_tables_stay_on_the_nodes_and_survive_a_restart_from_their_disk(tmp_path):
    from fedmeta.model.recommender import PRIVATE_PREFIX

    over = TINY + ["model.private_item_embeddings=true"]
    ref = inprocess.run(compose(over), tmp_path / "ref", echo=lambda line: None)
    grid = RecordingGrid(client_app, N_CLIENTS)
    got = run_server(grid, {"overrides": " ".join(over), "output-dir": str(tmp_path / "flower")},
                     echo=lambda line: None)
    _close(ref["final_metrics"], got["final_metrics"])
    trained = [c for c in grid.ctx.values() if "fedmeta.private" in c.state.array_records]
    assert len(trained) == 4                             # every training node, no new client
    assert all(c.state["fedmeta.private-round"]["round"] == 2 for c in trained)
    # nothing a node sent carries the table: no such tensor, and the state is accounting only
    for reply in grid.replies:
        for record in reply.content.array_records.values():
            assert not any(k.startswith(PRIVATE_PREFIX) for k in record)
        meta = reply.content.config_records.get("meta")
        if meta is not None and "state" in meta:
            assert set(json.loads(meta["state"])) <= {"dp", "epsilon", "delta"}
    # in simulation the nodes keep the tables under the run's directory, one file per round
    files = sorted(p.name for p in (tmp_path / "flower" / "client_state").rglob("*.safetensors"))
    assert files == sorted(["private_r1.safetensors", "private_r2.safetensors"] * 4)

    # kill after round 1, finish the run (round-2 files now exist), then restart from the
    # round-1 checkpoint on fresh nodes: they must take round 1's tables, not round 2's
    out = tmp_path / "cut"
    run_server(LoopbackGrid(client_app, N_CLIENTS),
               {"overrides": " ".join(over), "output-dir": str(out), "stop-after": 1},
               echo=lambda line: None)
    shutil.copytree(out / "checkpoint", tmp_path / "round1")
    resume = {"overrides": " ".join(over + ["runtime.resume=true"]), "output-dir": str(out)}
    run_server(LoopbackGrid(client_app, N_CLIENTS), resume, echo=lambda line: None)
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(tmp_path / "round1", out / "checkpoint")
    resumed = run_server(LoopbackGrid(client_app, N_CLIENTS), resume, echo=lambda line: None)
    _close(ref["final_metrics"], resumed["final_metrics"])


class LateReplyGrid(LoopbackGrid):
    """Node ``late`` trains in round 1 but its reply never reaches the server (the round timed
    out), and the node then restarts, losing its Context.state."""

    def __init__(self, *args, late: int, **kw):
        super().__init__(*args, **kw)
        self.late, self.train_calls = late, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == 1:
                self.ctx[self.late].state = RecordDict()
                return [r for m, r in zip(messages, replies) if m.metadata.dst_node_id != self.late]
        return replies


def test_a_timed_out_dp_client_is_charged_the_round_it_may_have_spent(reference, tmp_path):
    grid = LateReplyGrid(client_app, N_CLIENTS, late=100)
    got = run_server(grid, {"overrides": " ".join(TINY), "output-dir": str(tmp_path)},
                     echo=lambda line: None)
    cid = federation_for(tuple(TINY)).clients[0].client_id
    assert "TimeoutError" in got["rounds"][0]["failures"][cid]
    # it really trained both rounds; after its restart the server's charged copy made it
    # account for both, so it reports what it spent, not one round's epsilon
    assert got["client_epsilon"][cid] == pytest.approx(reference[0]["client_epsilon"][cid],
                                                       rel=1e-9)
