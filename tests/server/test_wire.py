"""The wire format: exact arrays, strict instructions, replies checked by name."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedmeta.algorithms.base import ClientUpdate
import wire


def _params():
    g = torch.Generator().manual_seed(0)
    return {"z.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g),
            "m.half": torch.randn(2, 2, generator=g).to(torch.float64)}


def test_arrays_round_trip_exactly_keeping_order_dtype_and_shape():
    p = _params()
    back = wire.from_record(wire.to_record(p))
    assert list(back) == list(p)
    for k in p:
        assert back[k].dtype == p[k].dtype and torch.equal(back[k], p[k])
    assert wire.record_nbytes(wire.to_record(p)) >= sum(v.numel() * v.element_size()
                                                         for v in p.values())


def test_an_instruction_carries_only_arrays_round_run_and_client():
    p, run = _params(), {"seed": 3, "model": {"size": "tiny"}}
    content = wire.instruction(p, 2, run, "social-1")
    assert set(content.keys()) == {wire.ARRAYS, wire.CONFIG}
    assert set(content[wire.CONFIG].keys()) == wire.ALLOWED_CONFIG
    params, rnd, back, cid = wire.read_instruction(content)
    assert rnd == 2 and back == run and cid == "social-1" and torch.equal(params["a.bias"], p["a.bias"])


@pytest.mark.parametrize("extra", [{"fedmeta.overrides": json.dumps(["privacy=none"])},
                                   {"fedmeta.state": "{}"}, {"noise_multiplier": 0.0},
                                   {"privacy.local.enabled": False}])
def test_any_other_config_key_is_refused_by_name(extra):
    content = wire.instruction(_params(), 1, {}, "c")
    content[wire.CONFIG] = ConfigRecord({**content[wire.CONFIG], **extra})
    with pytest.raises(wire.WireError, match=next(iter(extra))):
        wire.read_instruction(content)


def test_extra_records_bad_rounds_and_bad_json_are_refused():
    content = wire.instruction(_params(), 1, {}, "c")
    content["state"] = ConfigRecord({"x": 1})
    with pytest.raises(wire.WireError, match="unexpected record"):
        wire.read_instruction(content)
    for bad in (0, True, "1"):
        c = wire.instruction(_params(), 1, {}, "c")
        c[wire.CONFIG] = ConfigRecord({**c[wire.CONFIG], wire.ROUND: bad})
        with pytest.raises(wire.WireError, match="server-round"):
            wire.read_instruction(c)
    c = wire.instruction(_params(), 1, {}, "c")
    c[wire.CONFIG] = ConfigRecord({**c[wire.CONFIG], wire.RUN: "{nope"})
    with pytest.raises(wire.WireError, match="JSON"):
        wire.read_instruction(c)


def test_update_reply_round_trip_and_missing_parts_are_named():
    u = ClientUpdate(_params(), 7, {"epsilon": 1.5, "delta": 1e-5})
    back = wire.read_update(wire.update_reply(u, "c"))
    assert back.num_tasks == 7 and back.metrics == {"epsilon": 1.5, "delta": 1e-5}
    assert all(torch.equal(back.delta[k], u.delta[k]) for k in u.delta)
    assert wire.reply_client(wire.update_reply(u, "c")) == "c"
    with pytest.raises(wire.WireError, match="update"):
        wire.read_update(RecordDict({}))
    with pytest.raises(wire.WireError, match="not a number"):
        wire.update_reply(ClientUpdate(_params(), 1, {"x": "high"}), "c")


def test_metric_rows_round_trip_including_nan_and_empty():
    rows = [{"round": 1, "population": "cold", "stage": "after", "domain": "d", "client": "c",
             "metric": "ndcg@10", "value": float("nan")}]
    back = wire.read_rows(wire.rows_reply(rows, "c"))
    assert back[0]["metric"] == "ndcg@10" and math.isnan(back[0]["value"])
    assert wire.read_rows(wire.rows_reply([], "c")) == []
