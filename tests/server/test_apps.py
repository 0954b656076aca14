"""The Flower apps on an in-process grid (no Ray, no SuperLink): Flower must only be transport.

A loopback ``Grid`` hands each message straight to the ClientApp with that node's ``Context``;
the ServerApp's loop, the meta-strategy and the ClientApp run unchanged. A new grid has empty
``Context.state``s, which is what a restarted simulation looks like to the clients.
"""

from __future__ import annotations

import json
import math
import time
import uuid

import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from clients.app import federation_for
from fedmeta.runtime import inprocess
from fedmeta.runtime.hydra_config import compose
from server.app import run_server
from server.codec import from_array_record, records_to_rows, to_array_record

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
    ref, ref_rows, _ = reference[0], reference[1], None
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
    overrides = [o for o in TINY if not o.startswith("privacy")] + ["runtime.rounds=1"]
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
